import json

import pytest
import torch
import torch.nn.functional as F

from conftest import make_gpt
from vargen.cli import main
import vargen.decoding.nar as nar_decoding
from vargen.decoding import DecodeSession, SamplingConfig, decode_nar, get_method
from vargen.decoding.nar_order import anti_diagonals, parents, proximity_mask, proximity_slot_mask
from vargen.models import LlamaGen
from vargen.models.nar import NARModel, load_nar
from vargen.models.text import WordTextEncoder, build_vocabulary
from vargen.pipeline import tiny_random_pipeline
from vargen.tokenizers import VQTokenizer
from vargen.train.nar import nar_step

GRIDS = [(1, 1), (1, 5), (5, 1), (2, 3), (3, 4), (4, 4), (4, 2)]


def make_nar(model_type="c2i", head_layers=1, grid=(4, 4), **kw):
    """A NAR model from a tiny random AR GPT, with non-trivial (non-identity) head blocks."""
    H, W = grid
    ar = make_gpt(model_type, block=H * W, grid_rows=H, **kw)
    nar = NARModel.from_ar(ar, head_layers=head_layers).eval()
    for head in (nar.right_head, nar.below_head):
        for p in head.parameters():
            torch.nn.init.normal_(p, 0.0, 0.2)
    return ar, nar


def conditions(model_type, B=2):
    if model_type == "t2i":
        cond_mask = torch.ones(B, 6, dtype=torch.bool)
        cond_mask[0, :2] = False
        return torch.randn(B, 6, 24), cond_mask
    return torch.arange(B) % 5, None


def brute_mask(grid, P, cells, real=None):
    """The proximity mask by its definition, entry by entry."""
    W = grid[1]
    kinds = [("cond", i) for i in range(P)] + [("img", c // W + c % W) for c in cells]
    real = [True] * P if real is None else list(real)
    T = len(kinds)
    out = torch.zeros(T, T, dtype=torch.bool)
    for q, (qk, qv) in enumerate(kinds):
        for k, (kk, kv) in enumerate(kinds):
            if q == k:
                want = True
            elif kk == "cond":
                want = real[k] and (qk == "img" or k < q)
            else:
                want = qk == "img" and kv <= qv
            out[q, k] = want
    return out


# ----------------------------------------------------------------------------- schedule, parents, masks
@pytest.mark.parametrize("grid", GRIDS)
def test_anti_diagonals_cover_every_cell_once_in_h_plus_w_minus_1_steps(grid):
    H, W = grid
    groups = anti_diagonals(grid)
    assert len(groups) == H + W - 1
    assert sorted(c for g in groups for c in g) == list(range(H * W))
    for c, g in enumerate(groups):
        assert g == sorted(g) and g and all(k // W + k % W == c for k in g)


@pytest.mark.parametrize("grid", GRIDS)
def test_parents_are_the_left_and_upper_neighbours(grid):
    H, W = grid
    left, up = parents(grid)
    for i in range(H):
        for j in range(W):
            k = i * W + j
            assert left[k] == (i * W + j - 1 if j > 0 else -1)
            assert up[k] == ((i - 1) * W + j if i > 0 else -1)
            for p in (left[k], up[k]):  # parents lie on the previous anti-diagonal
                assert p < 0 or p // W + p % W == i + j - 1


@pytest.mark.parametrize("grid", [(3, 4), (4, 4), (2, 5)])
@pytest.mark.parametrize("with_pads", [False, True])
def test_proximity_mask_matches_the_definition_entry_by_entry(grid, with_pads):
    P, N = 3, grid[0] * grid[1]
    cond_mask = torch.tensor([[False, True, True], [True, True, True]]) if with_pads else None
    for cells in (list(range(N)), list(range(N - 1)), torch.randperm(N, generator=torch.Generator().manual_seed(0))
                  [: N // 2].tolist()):
        mask = proximity_mask(grid, P, cells, cond_mask)
        assert mask.shape == ((2 if with_pads else 1), P + len(cells), P + len(cells))
        for b in range(mask.shape[0]):
            want = brute_mask(grid, P, cells, None if cond_mask is None else cond_mask[b].tolist())
            assert torch.equal(mask[b], want)


def test_decoding_slot_mask_is_the_proximity_mask_over_raster_slots():
    grid, P, N = (3, 4), 2, 12
    cond_visible = torch.tensor([[False, True], [True, True]])
    full = proximity_mask(grid, P, None, cond_visible)  # rows/cols: [cond, cells 0..N-1 in raster] = slots
    for c, cells in enumerate(anti_diagonals(grid)[:-1]):
        m = proximity_slot_mask(grid, c, len(cells), cond_visible, P + N + 3)
        assert m.shape == (2, len(cells), P + N + 3) and not m[:, :, P + N:].any()
        rows = [P + k for k in cells]
        assert torch.equal(m[:, :, :P + N], full[:, rows])


# ----------------------------------------------------------------------------- the model
def test_from_ar_heads_start_as_the_identity(one_thread):
    ar = make_gpt("c2i")
    nar = NARModel.from_ar(ar, head_layers=2)
    tokens = torch.randint(0, 48, (2, 16))
    with torch.no_grad():
        h = torch.cat([ar.condition_embeddings(torch.tensor([1, 2])), ar.tok_embeddings(tokens)], 1)
        positions = torch.cat([torch.full((1,), -1), torch.arange(16)]).expand(2, -1)
        right, below = nar.head_logits(embeds=h, positions=positions)
        want = ar(embeds=h, positions=positions)
    torch.testing.assert_close(right, want)
    torch.testing.assert_close(below, want)
    assert len(nar.new_cache(1).k) == 2 + 2 * 2 and nar.num_steps == 7


def reference_cell_logits(nar, tokens, cond, cond_mask):
    """Slow reference: cell by cell, a forward over [condition, tokens on earlier anti-diagonals] under a
    brute-force proximity mask, then the heads at the cell's parents (the mean where there are two)."""
    H, W = nar.grid
    B, N = tokens.shape
    prefix = nar.condition_embeddings(cond)
    P = prefix.shape[1]
    out = torch.zeros(B, N, nar.vocab_size)
    for n in range(N):
        d = n // W + n % W
        cells = [k for k in range(N) if k // W + k % W < d]
        h = torch.cat([prefix, nar.gpt.tok_embeddings(tokens[:, cells])], 1)
        positions = torch.tensor([-1] * P + cells).expand(B, -1)
        mask = torch.stack([brute_mask((H, W), P, cells, None if cond_mask is None else cond_mask[b].tolist())
                            for b in range(B)])
        right, below = nar.head_logits(embeds=h, positions=positions, mask=mask)
        if n == 0:
            out[:, n] = (right[:, P - 1] + below[:, P - 1]) / 2
            continue
        got = []
        if n % W > 0:
            got.append(right[:, P + cells.index(n - 1)])
        if n >= W:
            got.append(below[:, P + cells.index(n - W)])
        out[:, n] = sum(got) / len(got)
    return out


@pytest.mark.parametrize("model_type,grid", [("c2i", (4, 4)), ("t2i", (3, 4))])
def test_teacher_forced_loss_is_the_sum_of_per_cell_cross_entropies(one_thread, model_type, grid):
    _, nar = make_nar(model_type, grid=grid, head_layers=2)
    cond, cond_mask = conditions(model_type)
    N = grid[0] * grid[1]
    tokens = torch.randint(0, 48, (2, N), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        loss, logits = nar.training_loss(tokens, cond, cond_mask=cond_mask)
        ref = reference_cell_logits(nar, tokens, cond, cond_mask)
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    per_cell = sum(F.cross_entropy(ref[b, n][None], tokens[b, n][None]) for b in range(2) for n in range(N))
    torch.testing.assert_close(loss * 2 * N, per_cell, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("model_type,grid", [("c2i", (4, 4)), ("t2i", (3, 4)), ("c2i", (2, 5))])
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_cached_decode_gives_the_training_forwards_logits(one_thread, monkeypatch, model_type, grid, cfg):
    _, nar = make_nar(model_type, grid=grid, head_layers=2)
    cond, cond_mask = conditions(model_type)
    seen, target_pass = [], nar_decoding.target_pass  # each pass's probabilities, as the step samples them
    monkeypatch.setattr(nar_decoding, "target_pass",
                        lambda *a, **k: (lambda out: seen.append(out[0]) or out)(target_pass(*a, **k)))
    prefill = DecodeSession.prefill
    monkeypatch.setattr(DecodeSession, "prefill", lambda self: seen.append(prefill(self)[:, None]) or seen[-1][:, 0])
    tokens, stats = decode_nar(nar, cond, SamplingConfig(cfg_scale=cfg), [4, 5], cond_mask=cond_mask)
    assert stats.forward_passes == len(seen) == sum(grid) - 1
    order = [c for g in anti_diagonals(grid) for c in g]
    with torch.no_grad():  # the whole grid at once, teacher-forced on the decoded tokens, no cache
        logits = nar.forward_train(tokens, cond, cond_mask=cond_mask)
        if cfg != 1:
            uncond = nar.forward_train(tokens, cond, cond_mask=cond_mask, null=True)
            logits = uncond + cfg * (logits - uncond)
    torch.testing.assert_close(torch.cat(seen, 1), logits.softmax(-1)[:, order], atol=1e-5, rtol=1e-4)


def test_decode_is_batch_invariant_and_reports_step_compression(one_thread):
    _, nar = make_nar()
    sampling = SamplingConfig(cfg_scale=2.0, top_k=20)
    both, stats = decode_nar(nar, torch.tensor([1, 2]), sampling, seeds=[8, 9])
    alone, _ = decode_nar(nar, torch.tensor([2]), sampling, seeds=[9])
    assert torch.equal(both[1:], alone)
    assert stats.forward_passes == 7 and stats.per_sample_forward_passes == [7, 7]
    assert stats.accepted_hist == {1: 4, 2: 4, 3: 4, 4: 2} and stats.extra["step_compression"] == 16 / 7


def test_save_load_round_trip_gives_identical_logits(one_thread, tmp_path):
    _, nar = make_nar("t2i", head_layers=2)
    cond, cond_mask = conditions("t2i")
    tokens = torch.randint(0, 48, (2, 16))
    nar.save_pretrained(tmp_path / "nar")
    again = load_nar(str(tmp_path / "nar"))
    assert again.config.head_layers == 2 and not again.training
    with torch.no_grad():
        assert torch.equal(nar.forward_train(tokens, cond, cond_mask), again.forward_train(tokens, cond, cond_mask))
    assert torch.equal(NARModel.from_pretrained(str(tmp_path / "nar")).below_head[1].attention.wo.weight,
                       nar.below_head[1].attention.wo.weight)


def test_heads_only_save_shares_the_trunk_folder_and_refuses_a_fine_tuned_trunk(one_thread, tmp_path):
    from safetensors import safe_open

    ar, nar = make_nar("t2i", head_layers=1)
    ar.save_pretrained(tmp_path / "model" / "gpt")
    nar.save_pretrained(tmp_path / "model" / "nar", trunk="../gpt")
    with safe_open(str(tmp_path / "model" / "nar" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any(k.startswith("gpt.") for k in keys)  # heads only: no second copy of the GPT
    again = load_nar(str(tmp_path / "model" / "nar"))
    cond, cond_mask = conditions("t2i")
    tokens = torch.randint(0, 48, (2, 16))
    with torch.no_grad():
        assert torch.equal(nar.forward_train(tokens, cond, cond_mask), again.forward_train(tokens, cond, cond_mask))

    with torch.no_grad():
        nar.gpt.output.weight.add_(0.01)  # a fine-tuned trunk is not the saved GPT
    with pytest.raises(ValueError, match="trunk differs.*output.weight"):
        nar.save_pretrained(tmp_path / "model" / "nar2", trunk="../gpt")
    (tmp_path / "model" / "gpt" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="needs its trunk"):
        load_nar(str(tmp_path / "model" / "nar"))


def test_method_registry_decodes_a_random_gpt_in_h_plus_w_minus_1_passes(one_thread, tmp_path):
    ar, nar = make_nar()
    nar.save_pretrained(tmp_path / "nar")
    decode = get_method("nar", weights=str(tmp_path / "nar"))
    tokens, stats = decode(ar, torch.tensor([2, 3]), SamplingConfig(cfg_scale=2.0), [0, 1])
    direct, _ = decode_nar(nar, torch.tensor([2, 3]), SamplingConfig(cfg_scale=2.0), [0, 1])
    assert torch.equal(tokens, direct) and stats.method == "nar" and stats.forward_passes == 4 + 4 - 1
    ar.save_pretrained(tmp_path / "gpt")  # the default is <AR model folder>/nar
    loaded = LlamaGen.from_pretrained(str(tmp_path / "gpt"))
    assert torch.equal(get_method("nar")(loaded, torch.tensor([2, 3]), SamplingConfig(cfg_scale=2.0), [0, 1])[0],
                       direct)


def test_wrong_or_missing_nar_weights_fail_clearly(tmp_path):
    ar, nar = make_nar()
    hint = "vargen train nar --config configs/nar_scenes.json"
    with pytest.raises(FileNotFoundError, match=f"no NAR model at .*{hint}"):
        decode_nar(ar, torch.tensor([0]), weights=str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="not loaded from a folder.*vargen train nar"):
        decode_nar(ar, torch.tensor([0]))
    ar.save_pretrained(tmp_path / "gpt")
    with pytest.raises(ValueError, match="holds a LlamaGen checkpoint, not a NAR model"):
        decode_nar(ar, torch.tensor([0]), weights=str(tmp_path / "gpt"))
    with pytest.raises(ValueError, match="holds a LlamaGen checkpoint, not a NAR model"):
        NARModel.from_pretrained(str(tmp_path / "gpt"))
    _, other = make_nar(vocab=64)
    with pytest.raises(ValueError, match="vocab_size 64 vs 48"):
        decode_nar(ar, torch.tensor([0]), weights=other)
    with pytest.raises(ValueError, match="takes no option"):
        get_method("nar", steps=4)


# ----------------------------------------------------------------------------- training
VQ_MODEL = {"codebook_size": 64, "ch": 32, "ch_mult": [1, 2], "z_channels": 32, "num_res_blocks": 1}
SCENES = [{"name": "scenes", "resolution": 16, "seed": 0, "length": 16}]


def test_training_steps_reduce_the_loss(one_thread):
    _, nar = make_nar("t2i")
    nar.train()
    enc = WordTextEncoder(vocabulary=build_vocabulary(["a red circle", "two blue squares"]), caption_dim=24,
                          width=16, layers=1, heads=2, max_length=6).eval()
    batch = {"tokens": torch.randint(0, 48, (4, 16)), "captions": ["a red circle", "two blue squares"] * 2}
    opt = torch.optim.Adam(nar.parameters(), lr=3e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(8):
        loss, metrics = nar_step({"nar": nar}, batch, text_encoder=enc)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and 0 <= metrics["token_acc"] <= 1
    assert all(p.grad is None for p in enc.parameters())  # the text encoder stays frozen


def test_nar_recipe_via_cli_saves_a_loadable_model(one_thread, tmp_path):
    torch.manual_seed(0)
    VQTokenizer(**VQ_MODEL).save_pretrained(tmp_path / "vq")
    enc = WordTextEncoder(vocabulary=build_vocabulary(["a photo of a red circle"]), caption_dim=32, width=32,
                          layers=1, heads=2, max_length=12)
    enc.save_pretrained(tmp_path / "text_encoder")
    gpt = LlamaGen.from_size("GPT-tiny", model_type="t2i", block_size=64, vocab_size=64, caption_dim=32,
                             cls_token_num=12)
    gpt.save_pretrained(tmp_path / "gpt")
    config = {"init": str(tmp_path / "gpt"), "text_encoder": str(tmp_path / "text_encoder"),
              "tokenizer": str(tmp_path / "vq"), "data": SCENES, "head_layers": 1, "train_trunk": False,
              "steps": 3, "batch_size": 4, "lr": 1e-3, "log_every": 1}
    cfg_path = tmp_path / "nar.json"
    cfg_path.write_text(json.dumps(config))
    assert main(["train", "nar", "--config", str(cfg_path), "--out", str(tmp_path / "run")]) == 0
    nar = load_nar(str(tmp_path / "run" / "nar"))
    assert nar.num_tokens == 64 and nar.gpt.config.cls_token_num == 12
    for name, p in gpt.state_dict().items():  # train_trunk false: the GPT is untouched
        assert torch.equal(nar.gpt.state_dict()[name], p), name
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


# ----------------------------------------------------------------------------- CLI
def test_cli_generate_and_bench_with_a_nar_folder(one_thread, tmp_path, capsys):
    pipe = tiny_random_pipeline()
    pipe.save_pretrained(tmp_path / "model")
    NARModel.from_ar(pipe.gpt).save_pretrained(tmp_path / "model" / "nar")  # the model's own: the default
    out, st = tmp_path / "img.png", tmp_path / "stats.json"
    assert main(["generate", "class1", "--model", str(tmp_path / "model"), "-o", str(out), "--quiet",
                 "--method", "nar", "--stats", str(st)]) == 0
    stats = json.loads(st.read_text())
    H, W = pipe.gpt.grid
    assert stats["method"] == "nar" and stats["forward_passes"] == H + W - 1 and stats["tokens"] == H * W
    assert main(["bench", "speed", "--model", str(tmp_path / "model"), "--methods", "ar,nar", "-n", "2",
                 "--batch-size", "2", "--nar", str(tmp_path / "model" / "nar")]) == 0
    assert f"| nar | {H + W - 1:.1f} | {H * W / (H + W - 1):.2f}x |" in capsys.readouterr().out
    assert main(["generate", "class1", "--model", "tiny-random", "-o", str(out), "--quiet",
                 "--nar", str(tmp_path / "model" / "nar")]) == 2
    assert "--nar is not taken by ar; it is for nar" in capsys.readouterr().err
    assert main(["generate", "class1", "--model", "tiny-random", "-o", str(out), "--quiet", "--method", "nar"]) == 2
    assert "vargen train nar --config configs/nar_scenes.json" in capsys.readouterr().err
