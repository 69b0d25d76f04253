import json

import numpy as np
import pytest
import torch

from conftest import make_gpt
from vargen.cli import main
import vargen.decoding.lpd as lpd_decoding
from vargen.decoding import SamplingConfig, decode_lpd, get_method
from vargen.decoding.lpd_order import (PAPER_SCHEDULES, group_schedule, iter_groups, locality_groups,
                                       locality_orders, order_generator)
from vargen.models.lpd import LPD, load_lpd, lpd_attention_mask
from vargen.models.text import WordTextEncoder, build_vocabulary
from vargen.pipeline import tiny_random_pipeline
from vargen.tokenizers import VQTokenizer
from vargen.train.lpd import lpd_step

PAPER_20 = [1, 2, 4, 5, 7, 8, 10, 11, 12, 14, 15, 16, 17, 18, 18, 19, 19, 20, 20, 20]


def make_lpd(model_type="c2i", **kw):
    """An LPD model from a tiny random AR GPT, with a non-trivial mask token."""
    ar = make_gpt(model_type, **kw)
    lpd = LPD.from_ar(ar).eval()
    torch.nn.init.normal_(lpd.mask_token, 0.0, 0.5)
    return ar, lpd


def chebyshev(a, b, width):
    return max(abs(a // width - b // width), abs(a % width - b % width))


# ----------------------------------------------------------------------------- schedules and orders
def test_group_schedules_sum_to_the_tokens_with_the_requested_steps():
    assert group_schedule(256, 20) == PAPER_20 == PAPER_SCHEDULES[(256, 20)]
    for n in (16, 64, 256, 1024):
        for steps in {min(t, n) for t in (1, 2, 5, 8, 20, 32, 48, n // 2, n)}:
            for ramp in ("cosine", "linear"):
                sizes = group_schedule(n, steps, ramp)
                assert len(sizes) == steps and sum(sizes) == n and min(sizes) >= 1
                assert sizes == sorted(sizes) or (n, steps) in PAPER_SCHEDULES  # sizes grow with the step
                assert steps == 1 or sizes[0] == 1  # LPD starts from one cell
    with pytest.raises(ValueError, match="1 <= steps <= 16"):
        group_schedule(16, 17)
    with pytest.raises(ValueError, match="ramp"):
        group_schedule(16, 4, "square")


@pytest.mark.parametrize("kind", ["locality", "random", "raster"])
@pytest.mark.parametrize("grid,steps", [((4, 4), 4), ((8, 8), 10), ((16, 16), 20), ((5, 7), 6)])
def test_orders_are_permutations_cut_into_the_schedule(kind, grid, steps):
    n = grid[0] * grid[1]
    sizes = group_schedule(n, steps)
    gens = [order_generator(s) for s in (0, 1, 7)]
    groups = list(iter_groups(kind, grid, sizes, gens, repulsion=2.0))
    assert [g.shape for g in groups] == [(3, s) for s in sizes]
    orders = np.concatenate(groups, 1)
    for row in orders:
        assert sorted(row.tolist()) == list(range(n))
    if kind != "raster":
        assert not (orders[0] == orders[1]).all()  # per-sample orders


def test_locality_orders_depend_only_on_each_samples_seed():
    sizes = group_schedule(256, 20)
    batch, _ = locality_orders(16, 16, sizes, [order_generator(s) for s in (3, 4, 5)])
    alone, _ = locality_orders(16, 16, sizes, [order_generator(4)])
    assert torch.equal(batch[1], alone[0])
    first = locality_groups(16, 16, sizes, generator=order_generator(4))
    assert [c for near, fill in first for c in near + fill] == alone[0].tolist()


@pytest.mark.parametrize("grid,steps,repulsion", [((16, 16), 20, 2.0), ((16, 16), 32, 1.0), ((8, 8), 8, 2.0),
                                                  ((12, 10), 12, 2.0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_locality_groups_follow_proximity_and_repulsion(grid, steps, repulsion, seed):
    H, W = grid
    groups = locality_groups(H, W, group_schedule(H * W, steps), repulsion, order_generator(seed))
    done = set()
    for near, fill in groups:
        for i, c in enumerate(near):  # proximity picks repel each other ...
            assert all(chebyshev(c, o, W) > repulsion for o in near[:i])
            if done:  # ... and touch the cells of earlier steps (score >= 1: a 4-neighbour or two diagonals)
                score = sum(1 / np.hypot(c // W - o // W, c % W - o % W) for o in done if chebyshev(c, o, W) == 1)
                assert score >= 1 - 1e-9
        group = list(near)
        later = [c for c in range(H * W) if c not in done and c not in near]
        for c in fill:  # a fill pick breaks repulsion only when every free cell would have
            later.remove(c)
            if any(chebyshev(c, o, W) <= repulsion for o in group):
                assert all(any(chebyshev(x, o, W) <= repulsion for o in group) for x in later)
            group.append(c)
        done |= set(near) | set(fill)
    assert len(done) == H * W


# ----------------------------------------------------------------------------- training mask
@pytest.mark.parametrize("with_pads", [False, True])
def test_training_mask_matches_the_definition_cell_by_cell(with_pads):
    sizes, P = [1, 2, 3, 2], 3
    N, C = sum(sizes), sum(sizes) - sizes[-1]
    gid = [g for g, s in enumerate(sizes) for _ in range(s)]
    cond_mask = torch.tensor([[False, True, True], [True, True, True]]) if with_pads else None
    mask = lpd_attention_mask(sizes, P, cond_mask)
    T = P + C + N
    assert mask.shape == ((2 if with_pads else 1), T, T)
    kinds = [("cond", i) for i in range(P)] + [("ctx", g) for g in gid[:C]] + [("query", g) for g in gid]
    for b in range(mask.shape[0]):
        real = [True] * P if cond_mask is None else cond_mask[b].tolist()
        for q, (qk, qg) in enumerate(kinds):
            for k, (kk, kg) in enumerate(kinds):
                if q == k:
                    want = True
                elif kk == "cond":
                    want = real[k] and (qk != "cond" or k < q)
                elif kk == "ctx":
                    want = (qk == "ctx" and kg <= qg) or (qk == "query" and kg < qg)
                else:  # nothing attends to a query but the queries of its group
                    want = qk == "query" and kg == qg
                assert bool(mask[b, q, k]) == want, (b, kinds[q], kinds[k])
        assert mask[b].any(1).all()


# ----------------------------------------------------------------------------- decode == training forward
@pytest.mark.parametrize("model_type", ["c2i", "t2i"])
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_decode_step_by_step_gives_the_training_forwards_query_distributions(one_thread, monkeypatch, model_type,
                                                                               cfg):
    _, lpd = make_lpd(model_type)
    seeds, steps = [1, 2, 3], 5
    if model_type == "t2i":
        cond, cond_mask = torch.randn(3, 6, 24), torch.ones(3, 6, dtype=torch.bool)
        cond_mask[0, :2] = cond_mask[1, :1] = False
    else:
        cond, cond_mask = torch.tensor([0, 3, 4]), None
    seen, target_pass = [], lpd_decoding.target_pass  # each pass's probabilities, as the step samples them
    monkeypatch.setattr(lpd_decoding, "target_pass",
                        lambda *a, **k: (lambda out: seen.append(out[0]) or out)(target_pass(*a, **k)))
    tokens, stats = decode_lpd(lpd, cond, SamplingConfig(cfg_scale=cfg), seeds, cond_mask=cond_mask, steps=steps)
    sizes = group_schedule(16, steps)
    assert stats.forward_passes == steps + 1 and len(seen) == steps
    orders = torch.from_numpy(np.concatenate(list(iter_groups("locality", (4, 4), sizes,
                                                              [order_generator(s) for s in seeds])), 1))
    with torch.no_grad():  # the whole sequence at once under the group mask, teacher-forced on the decoded tokens
        logits = lpd.forward_train(tokens, cond, sizes, orders, cond_mask=cond_mask)
        if cfg != 1:
            uncond = lpd.forward_train(tokens, cond, sizes, orders, cond_mask=cond_mask, null=True)
            ramp = 1 + (cfg - 1) * torch.arange(16) / 16  # linear CFG by generation index
            logits = uncond + ramp[None, :, None] * (logits - uncond)
    decoded = torch.cat([p[:, -g:] for p, g in zip(seen, sizes)], 1)  # each step's query rows
    torch.testing.assert_close(decoded, logits.softmax(-1), atol=1e-5, rtol=1e-4)


def test_decode_is_batch_invariant_and_samples_follow_their_seed(one_thread):
    _, lpd = make_lpd()
    sampling = SamplingConfig(cfg_scale=2.0, top_k=20)
    both, _ = decode_lpd(lpd, torch.tensor([1, 2]), sampling, seeds=[8, 9], steps=6)
    alone, _ = decode_lpd(lpd, torch.tensor([2]), sampling, seeds=[9], steps=6)
    assert torch.equal(both[1:], alone)


# ----------------------------------------------------------------------------- the model
def test_from_ar_keeps_the_ar_model_and_adds_only_the_query(one_thread, tmp_path):
    ar, lpd = make_lpd("t2i")
    tokens, cond = torch.randint(0, 48, (2, 16)), torch.randn(2, 6, 24)
    with torch.no_grad():  # no query in the input: exactly the AR model
        prefix = ar.condition_embeddings(cond)
        h = torch.cat([prefix, ar.tok_embeddings(tokens)], 1)
        positions = torch.cat([torch.full((6,), -1), torch.arange(16)]).expand(2, -1)
        torch.testing.assert_close(lpd(embeds=h, positions=positions), ar(embeds=h, positions=positions))
        torch.testing.assert_close(lpd.embed_inputs(tokens), ar.tok_embeddings(tokens))
        assert torch.equal(lpd.embed_inputs(torch.full((1, 1), lpd.mask_id))[0, 0], lpd.mask_token)
    assert torch.allclose(LPD.from_ar(ar).mask_token, ar.tok_embeddings.weight.mean(0))
    # save / load round trip: identical logits
    sizes, orders = [1, 3, 5, 7], torch.stack([torch.randperm(16) for _ in range(2)])
    lpd.save_pretrained(tmp_path / "lpd")
    again = load_lpd(str(tmp_path / "lpd"))
    with torch.no_grad():
        assert torch.equal(lpd.forward_train(tokens, cond, sizes, orders),
                           again.forward_train(tokens, cond, sizes, orders))


def test_raster_order_group_size_one_decodes_every_token(one_thread):
    _, lpd = make_lpd()
    tokens, stats = decode_lpd(lpd, torch.tensor([0, 1]), SamplingConfig(top_k=10), seeds=[0, 1], steps=16,
                               order="raster")
    assert tokens.shape == (2, 16) and tokens.min() >= 0 and tokens.max() < 48
    assert stats.forward_passes == 17 and stats.extra["group_sizes"] == [1] * 16
    # one entry per sample per pass: the condition prefill commits no token, each group pass one
    assert stats.per_sample_forward_passes == [17, 17] and stats.accepted_hist == {0: 2, 1: 32}


def test_method_registry_loads_lpd_weights_beside_the_ar_model(one_thread, tmp_path):
    ar, lpd = make_lpd()
    lpd.save_pretrained(tmp_path / "lpd")
    decode = get_method("lpd", weights=str(tmp_path / "lpd"), steps=4)
    tokens, stats = decode(ar, torch.tensor([2, 3]), SamplingConfig(cfg_scale=2.0), [0, 1])
    direct, _ = decode_lpd(lpd, torch.tensor([2, 3]), SamplingConfig(cfg_scale=2.0), [0, 1], steps=4)
    assert torch.equal(tokens, direct) and stats.method == "lpd" and stats.forward_passes == 5
    # the default is <AR model folder>/lpd
    ar.save_pretrained(tmp_path / "gpt")
    from vargen.models import LlamaGen

    loaded = LlamaGen.from_pretrained(str(tmp_path / "gpt"))
    assert torch.equal(get_method("lpd", steps=4)(loaded, torch.tensor([2, 3]), SamplingConfig(cfg_scale=2.0),
                                                  [0, 1])[0], direct)


def test_wrong_or_missing_lpd_weights_fail_clearly(tmp_path):
    ar, lpd = make_lpd()
    with pytest.raises(FileNotFoundError, match="vargen train lpd --config configs/lpd_scenes.json"):
        decode_lpd(ar, torch.tensor([0]), weights=str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="not loaded from a folder.*vargen train lpd"):
        decode_lpd(ar, torch.tensor([0]))
    ar.save_pretrained(tmp_path / "gpt")
    with pytest.raises(ValueError, match="holds a LlamaGen checkpoint, not an LPD model"):
        decode_lpd(ar, torch.tensor([0]), weights=str(tmp_path / "gpt"))
    _, other = make_lpd(vocab=64)
    with pytest.raises(ValueError, match="vocab_size 64 vs 48"):
        decode_lpd(ar, torch.tensor([0]), weights=other)
    with pytest.raises(ValueError, match="unknown LPD order"):
        decode_lpd(lpd, torch.tensor([0]), order="spiral")
    with pytest.raises(ValueError, match="1 <= steps <= 16"):
        decode_lpd(lpd, torch.tensor([0]), steps=20)


# ----------------------------------------------------------------------------- training
VQ_MODEL = {"codebook_size": 64, "ch": 32, "ch_mult": [1, 2], "z_channels": 32, "num_res_blocks": 1}
SCENES = [{"name": "scenes", "resolution": 16, "seed": 0, "length": 16}]


def test_training_steps_reduce_the_query_loss(one_thread):
    _, lpd = make_lpd("t2i")
    lpd.train()
    enc = WordTextEncoder(vocabulary=build_vocabulary(["a red circle", "two blue squares"]), caption_dim=24,
                          width=16, layers=1, heads=2, max_length=6).eval()
    batch = {"tokens": torch.randint(0, 48, (4, 16)), "captions": ["a red circle", "two blue squares"] * 2}
    opt = torch.optim.Adam(lpd.parameters(), lr=3e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(8):
        loss, metrics = lpd_step({"lpd": lpd}, batch, text_encoder=enc, train_steps=(4,))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and metrics["groups"] == 4
    assert all(p.grad is None for p in enc.parameters())  # the text encoder stays frozen


def test_lpd_recipe_via_cli_saves_a_loadable_model(one_thread, tmp_path):
    from vargen.models import LlamaGen

    torch.manual_seed(0)
    VQTokenizer(**VQ_MODEL).save_pretrained(tmp_path / "vq")
    enc = WordTextEncoder(vocabulary=build_vocabulary(["a photo of a red circle"]), caption_dim=32, width=32,
                          layers=1, heads=2, max_length=12)
    enc.save_pretrained(tmp_path / "text_encoder")
    LlamaGen.from_size("GPT-tiny", model_type="t2i", block_size=64, vocab_size=64, caption_dim=32,
                       cls_token_num=12).save_pretrained(tmp_path / "gpt")
    config = {"init": str(tmp_path / "gpt"), "text_encoder": str(tmp_path / "text_encoder"),
              "tokenizer": str(tmp_path / "vq"), "data": SCENES, "train_steps": [4, 8], "steps": 3,
              "batch_size": 4, "lr": 1e-3, "log_every": 1}
    cfg_path = tmp_path / "lpd.json"
    cfg_path.write_text(json.dumps(config))
    assert main(["train", "lpd", "--config", str(cfg_path), "--out", str(tmp_path / "run")]) == 0
    lpd = load_lpd(str(tmp_path / "run" / "lpd"))
    assert lpd.num_tokens == 64 and lpd.gpt.config.cls_token_num == 12
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    bad = dict(config, tokenizer=str(tmp_path / "vq2"))
    VQTokenizer(**{**VQ_MODEL, "codebook_size": 32}).save_pretrained(tmp_path / "vq2")
    cfg_path.write_text(json.dumps(bad))
    assert main(["train", "lpd", "--config", str(cfg_path), "--out", str(tmp_path / "run2")]) == 2


# ----------------------------------------------------------------------------- CLI
def test_cli_lpd_without_a_model_names_the_train_command(one_thread, tmp_path, capsys):
    out = str(tmp_path / "x.png")
    assert main(["generate", "class1", "--model", "tiny-random", "-o", out, "--quiet", "--method", "lpd"]) == 2
    assert "vargen train lpd --config configs/lpd_scenes.json" in capsys.readouterr().err
    assert main(["generate", "class1", "--model", "tiny-random", "-o", out, "--quiet", "--method", "lpd",
                 "--lpd", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "no LPD model at" in err and "vargen train lpd" in err
    assert main(["generate", "class1", "--model", "tiny-random", "-o", out, "--quiet", "--lpd-steps", "8"]) == 2
    assert "--lpd-steps is not taken by ar; it is for lpd" in capsys.readouterr().err


def test_cli_generate_and_bench_with_an_lpd_folder(one_thread, tmp_path, capsys):
    pipe = tiny_random_pipeline()
    pipe.save_pretrained(tmp_path / "model")
    LPD.from_ar(pipe.gpt).save_pretrained(tmp_path / "model" / "lpd")  # the model's own: the default
    out, st = tmp_path / "img.png", tmp_path / "stats.json"
    assert main(["generate", "class1", "--model", str(tmp_path / "model"), "-o", str(out), "--quiet",
                 "--method", "lpd", "--lpd-steps", "6", "--stats", str(st)]) == 0
    stats = json.loads(st.read_text())
    assert stats["method"] == "lpd" and stats["forward_passes"] == 7 and stats["tokens"] == 64
    assert main(["bench", "speed", "--model", str(tmp_path / "model"), "--methods", "ar,lpd", "-n", "2",
                 "--batch-size", "2", "--lpd", str(tmp_path / "model" / "lpd"), "--lpd-steps", "6"]) == 0
    assert "| lpd | 7.0 |" in capsys.readouterr().out
