import json

import pytest
import torch

from conftest import make_gpt
from vargen.cli import main
from vargen.decoding import SamplingConfig, get_method
from vargen.decoding.acceptance import ExactAcceptance
from vargen.decoding.mulo import decode_mulo, later_neighbourhood
from vargen.models import LlamaGen
from vargen.models.mulo import MuLo, TokenUpsampler, load_mulo
from vargen.pipeline import tiny_random_pipeline


def make_upsampler(vocab=48, low=(4, 4), scale=2, seed=0):
    torch.manual_seed(seed)
    up = TokenUpsampler.from_codebook(torch.randn(vocab, 8), low, scale, dim=16, blocks=1, groups=4)
    for p in up.out.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    return up.eval()


def make_mulo(model_type="t2i", vocab=48, low=4, seed=1, **kw):
    drafter = make_gpt(model_type, vocab=vocab, block=low * low, seed=seed, **kw)
    return MuLo(drafter, make_upsampler(vocab, (low, low), 2, seed))


def t2i_cond(B=3):
    cond_mask = torch.ones(B, 6, dtype=torch.bool)
    cond_mask[0, :2] = False
    return torch.randn(B, 6, 24), cond_mask


# ----------------------------------------------------------------------------- the up-sampler and the folder
def test_upsampler_shape_codebook_init_and_round_trip(one_thread, tmp_path):
    codebook = torch.randn(48, 8)
    up = TokenUpsampler.from_codebook(codebook, (4, 3), 2, dim=16, blocks=1, groups=4).eval()
    assert torch.equal(up.embed.weight, codebook) and up.high_grid == (8, 6)
    low = torch.randint(0, 48, (2, 12))
    out = up(low)
    assert out.shape == (2, 48, 48) and out.dtype == torch.float32
    assert torch.equal(up(low.view(2, 4, 3)), out)
    up.save_pretrained(tmp_path / "up")
    again = TokenUpsampler.from_pretrained(tmp_path / "up").eval()
    torch.testing.assert_close(again(low), out)
    with pytest.raises(ValueError, match="4x3 low-resolution grid"):
        up(torch.zeros(2, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="vocabularies do not match"):
        up(torch.full((2, 12), 48))

    mulo = MuLo(make_gpt("t2i", vocab=48, block=12, grid_rows=4), up)
    mulo.save_pretrained(tmp_path / "mulo")
    loaded = load_mulo(str(tmp_path / "mulo"))
    torch.testing.assert_close(loaded.upsampler(low), out)
    for k, v in mulo.drafter.state_dict().items():
        assert torch.equal(loaded.drafter.state_dict()[k], v), k


def test_mismatched_pair_and_target_fail_clearly(one_thread):
    with pytest.raises(ValueError, match="drafter makes a .* grid but the up-sampler takes"):
        MuLo(make_gpt("t2i", vocab=48, block=9), make_upsampler(48, (4, 4)))
    with pytest.raises(ValueError, match="drafter has 32 tokens but the up-sampler 48"):
        MuLo(make_gpt("t2i", vocab=32, block=16), make_upsampler(48, (4, 4)))
    mulo = make_mulo()
    with pytest.raises(ValueError, match=r"up-sampled grid \(8, 8\) vs the target's \(4, 4\).*vargen train mulo"):
        mulo.check_matches(make_gpt("t2i", vocab=48, block=16))
    with pytest.raises(ValueError, match="caption_dim 24 vs 32"):
        mulo.check_matches(make_gpt("t2i", vocab=48, block=64, caption_dim=32))


def test_missing_or_wrong_mulo_folder_fails_clearly(one_thread, tmp_path):
    ar = make_gpt("t2i", vocab=48, block=64)
    cond, cond_mask = t2i_cond(1)
    with pytest.raises(FileNotFoundError, match="not loaded from a folder.*--mulo PATH.*vargen train mulo"):
        decode_mulo(ar, cond, seeds=[0], cond_mask=cond_mask)
    with pytest.raises(FileNotFoundError, match="no MuLo model at .*vargen train mulo"):
        decode_mulo(ar, cond, seeds=[0], cond_mask=cond_mask, weights=str(tmp_path / "nowhere"))
    ar.save_pretrained(tmp_path / "model" / "gpt")
    loaded = LlamaGen.from_pretrained(tmp_path / "model" / "gpt").eval()
    with pytest.raises(FileNotFoundError, match=r"mulo' is missing\) and no --mulo PATH"):
        decode_mulo(loaded, cond, seeds=[0], cond_mask=cond_mask)
    ar.save_pretrained(tmp_path / "model" / "mulo" / "drafter")
    ar.save_pretrained(tmp_path / "model" / "mulo" / "upsampler")  # a GPT where the up-sampler should be
    with pytest.raises(ValueError, match="holds a LlamaGen checkpoint, not a MuLo TokenUpsampler"):
        decode_mulo(loaded, cond, seeds=[0], cond_mask=cond_mask)
    wrong = make_mulo(low=2)  # drafts a 4 x 4 grid for an 8 x 8 target
    with pytest.raises(ValueError, match="does not match the target"):
        decode_mulo(ar, cond, seeds=[0], cond_mask=cond_mask, weights=wrong)


# ----------------------------------------------------------------------------- the neighbourhood
def brute_neighbourhood(changed, grid, radius):
    H, W = grid
    B, N = changed.shape
    out = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        for k in range(N):
            for j in range(N):
                if changed[b, j] and j < k and abs(k // W - j // W) <= radius and abs(k % W - j % W) <= radius:
                    out[b, k] = True
    return out


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (5, 2), (1, 6), (6, 1)])
@pytest.mark.parametrize("radius", [0, 1, 2, 3])
def test_later_neighbourhood_matches_brute_force(grid, radius):
    g = torch.Generator().manual_seed(radius * 10 + grid[0])
    N = grid[0] * grid[1]
    changed = torch.rand(4, N, generator=g) < torch.tensor([0.0, 0.1, 0.3, 1.0])[:, None]
    changed[0, N // 2] = True
    assert torch.equal(later_neighbourhood(changed, grid, radius), brute_neighbourhood(changed, grid, radius))


# ----------------------------------------------------------------------------- decoding
def test_decode_returns_valid_tokens_and_consistent_stats(one_thread):
    ar, mulo = make_gpt("t2i", vocab=48, block=64), make_mulo()
    cond, cond_mask = t2i_cond(3)
    sampling = SamplingConfig(cfg_scale=2.0, top_k=20)
    tokens, stats = decode_mulo(ar, cond, sampling, [0, 1, 2], cond_mask, weights=mulo, max_rounds=4)
    assert tokens.shape == (3, 64) and tokens.dtype == torch.long
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 48
    ex = stats.extra
    assert ex["drafter_forward_passes"] == 16 and ex["checked_per_round"][0] == 64
    assert stats.per_sample_forward_passes == [1 + r for r in ex["rounds"]]
    assert stats.forward_passes == 1 + max(ex["rounds"]) <= 1 + 4
    assert ex["step_compression"] == pytest.approx(64 / (sum(stats.per_sample_forward_passes) / 3))
    assert len(ex["accepted_per_round"]) == max(ex["rounds"]) and all(0 <= a <= 1 for a in ex["accepted_per_round"])
    assert len(ex["accepted_cells"]) == 64
    # each sample depends on its own seed only
    alone, _ = decode_mulo(ar, cond[1:2], sampling, [1], cond_mask[1:2], weights=mulo, max_rounds=4)
    assert torch.equal(alone[0], tokens[1])
    # by default rounds run until nothing is pending (at most N: the first changed cell moves forward every round)
    _, st_all = decode_mulo(ar, cond, sampling, [0, 1, 2], cond_mask, weights=mulo)
    assert st_all.extra["max_rounds"] == 64 and st_all.extra["pending_at_limit"] == [0, 0, 0]
    assert st_all.extra["radius"] == 1 and st_all.extra["expand"] == 1
    # finish="ar" resamples the pending cells by plain AR: more passes, still valid tokens
    tok_ar, st_ar = decode_mulo(ar, cond, sampling, [0, 1, 2], cond_mask, weights=mulo, max_rounds=1, finish="ar")
    assert int(tok_ar.max()) < 48 and all(p >= 2 for p in st_ar.per_sample_forward_passes)
    assert max(st_ar.per_sample_forward_passes) > 2


class Recording(ExactAcceptance):
    def __init__(self):
        self.calls = []

    def accept(self, p, q, drafts, coins):
        self.calls.append((p.clone(), drafts.clone()))
        return super().accept(p, q, drafts, coins)


def test_every_round_judges_with_the_target_distribution_of_the_current_tokens(one_thread):
    """Cache honesty: after rollbacks to the first changed cell, p of every cell judged in a round is the target's
    teacher-forced distribution given the tokens at that moment; the judged cells are the expanding
    neighbourhoods (radius 2, 3, 4, ...) of the previous round's changes."""
    ar, mulo = make_gpt("t2i", vocab=48, block=64), make_mulo()
    cond, cond_mask = t2i_cond(3)
    rule = Recording()
    _, stats = decode_mulo(ar, cond, SamplingConfig(), [3, 4, 5], cond_mask, weights=mulo, radius=2, expand=1,
                           max_rounds=5, acceptance=rule)
    assert len(rule.calls) == stats.forward_passes - 1 >= 2
    checked = torch.ones(3, 64, dtype=torch.bool)
    prev, counts = None, []
    for t, (p, tokens) in enumerate(rule.calls):
        if prev is not None:  # an exact rejection never redraws its own token, so changed == rejected
            checked = later_neighbourhood(tokens != prev, (8, 8), 2 + (t - 1))
        want = torch.softmax(ar.forward_train(tokens, cond, cond_mask=cond_mask), -1)
        torch.testing.assert_close(p[checked], want[checked], atol=1e-5, rtol=1e-4)
        counts.append(float(checked.sum()) / 3)
        prev = tokens
    assert stats.extra["checked_per_round"] == pytest.approx(counts)


def context_free_target(vocab=48, block=64):
    """A c2i GPT whose every input (class and tokens) has the same embedding: every hidden state is the same,
    so ``p`` is one fixed distribution at every cell, whatever the context."""
    gpt = make_gpt("c2i", vocab=vocab, block=block)
    with torch.no_grad():
        gpt.tok_embeddings.weight[:] = gpt.tok_embeddings.weight[0]
        gpt.cls_embedding.embedding_table.weight[:] = gpt.tok_embeddings.weight[0]
        gpt.output.weight.mul_(3.0)
        h = gpt(embeds=gpt.tok_embeddings.weight[:1][None], positions=torch.zeros(1, 1, dtype=torch.long))
    return gpt, h[0, 0]


def upsampler_with_logits(logits, low=(4, 4)):
    up = make_upsampler(logits.shape[0], low)
    with torch.no_grad():
        up.out.weight.zero_()
        up.out.bias.copy_(logits)
    return up


def test_first_round_accepts_at_the_rate_sum_min_p_q(one_thread):
    gpt, logits = context_free_target()
    p = torch.softmax(logits, -1)
    drafter = make_gpt("c2i", vocab=48, block=16, seed=2)
    # q == p: every draft passes, one verify round, nothing left to re-judge
    mulo = MuLo(drafter, upsampler_with_logits(logits))
    tokens, stats = decode_mulo(gpt, torch.arange(4) % 5, SamplingConfig(), list(range(4)), weights=mulo)
    assert stats.extra["accepted_per_round"] == [1.0] and stats.forward_passes == 2
    assert stats.extra["step_compression"] == 32.0 and stats.extra["accepted_cells"] == [1.0] * 64
    # q != p: round 1 accepts sum(min(p, q)) of the cells in expectation; re-judging with q := p accepts all
    other = torch.randn(48) * 1.5
    q = torch.softmax(other, -1)
    mulo = MuLo(drafter, upsampler_with_logits(other))
    B = 16
    tokens, stats = decode_mulo(gpt, torch.arange(B) % 5, SamplingConfig(), list(range(B)), weights=mulo)
    rate, want = stats.extra["accepted_per_round"][0], float(torch.minimum(p, q).sum())
    assert abs(rate - want) < 4 * (want * (1 - want) / (B * 64)) ** 0.5 + 1e-6
    assert all(a == 1.0 for a in stats.extra["accepted_per_round"][1:])
    # and the committed tokens follow p (exact speculative sampling per cell)
    freq = torch.bincount(tokens.flatten(), minlength=48).float() / tokens.numel()
    assert 0.5 * (freq - p).abs().sum() < 0.12


def test_methods_table_and_lantern_variant(one_thread):
    gpt, logits = context_free_target()
    mulo = MuLo(make_gpt("c2i", vocab=48, block=16, seed=2), upsampler_with_logits(torch.randn(48)))
    decode = get_method("mulo+lantern", codebook=torch.randn(48, 8), weights=mulo, radius=2, lantern_delta=0.2)
    tokens, stats = decode(gpt, torch.arange(2), SamplingConfig(), [0, 1])
    assert stats.method == "mulo+lantern" and stats.extra["acceptance"] == "lantern" and stats.extra["radius"] == 2
    with pytest.raises(ValueError, match="takes no option"):
        get_method("mulo", window=4)


# ----------------------------------------------------------------------------- CLI
def test_cli_generate_bench_and_flag_errors(one_thread, tmp_path, capsys):
    pipe = tiny_random_pipeline()
    pipe.save_pretrained(tmp_path / "model")
    drafter = LlamaGen.from_size("GPT-tiny", block_size=16, vocab_size=256, num_classes=10)
    torch.nn.init.normal_(drafter.output.weight, 0.0, 0.02)
    MuLo(drafter.eval(), make_upsampler(256, (4, 4))).save_pretrained(tmp_path / "model" / "mulo")  # the default
    out, st = tmp_path / "img.png", tmp_path / "stats.json"
    assert main(["generate", "class1", "--model", str(tmp_path / "model"), "-o", str(out), "--quiet",
                 "--method", "mulo", "--mulo-rounds", "3", "--stats", str(st)]) == 0
    stats = json.loads(st.read_text())
    assert stats["method"] == "mulo" and stats["tokens"] == 64 and 2 <= stats["forward_passes"] <= 4
    assert stats["extra"]["max_rounds"] == 3 and stats["extra"]["drafter_forward_passes"] == 16
    assert main(["bench", "speed", "--model", str(tmp_path / "model"), "--methods", "ar,mulo", "-n", "2",
                 "--batch-size", "2", "--mulo", str(tmp_path / "model" / "mulo"), "--mulo-radius", "2"]) == 0
    assert "| mulo |" in capsys.readouterr().out
    assert main(["generate", "class1", "--model", "tiny-random", "-o", str(out), "--quiet",
                 "--mulo", str(tmp_path / "model" / "mulo")]) == 2
    assert "--mulo is not taken by ar; it is for mulo, mulo+lantern" in capsys.readouterr().err
    assert main(["generate", "class1", "--model", "tiny-random", "-o", str(out), "--quiet", "--method", "mulo"]) == 2
    assert "vargen train mulo --config configs/mulo_scenes_cpu.json" in capsys.readouterr().err


def test_mulo_recipe_via_cli_saves_a_loadable_pair(one_thread, tmp_path, capsys):
    from vargen.data.scenes import SceneDataset
    from vargen.models.text import WordTextEncoder, build_vocabulary
    from vargen.tokenizers import VQTokenizer

    torch.manual_seed(0)
    captions = [SceneDataset(seed=1).scene(i).caption for i in range(8)]
    enc = WordTextEncoder(vocabulary=build_vocabulary(captions), caption_dim=24, width=32, layers=1, heads=2,
                          max_length=16)
    enc.save_pretrained(tmp_path / "text_encoder")
    vq = VQTokenizer(codebook_size=32, ch=16, ch_mult=(1, 2, 2), z_channels=16, norm_groups=4)
    vq.save_pretrained(tmp_path / "vq")
    LlamaGen.from_size("GPT-tiny", model_type="t2i", vocab_size=32, block_size=64, caption_dim=24,
                       cls_token_num=16).save_pretrained(tmp_path / "gpt")
    cfg = {"target": str(tmp_path / "gpt"), "tokenizer": str(tmp_path / "vq"),
           "text_encoder": str(tmp_path / "text_encoder"), "data": {"name": "scenes", "seed": 1},
           "num_images": 8, "low_resolution": 16, "high_resolution": 32,
           "drafter": {"size": "GPT-tiny", "class_dropout_prob": 0.1}, "upsampler": {"dim": 16, "blocks": 1,
                                                                                       "groups": 4},
           "steps": 2, "batch_size": 4, "lr": 1e-3, "log_every": 1, "save_every": 2}
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    assert main(["train", "mulo", "--config", str(cfg_path), "--out", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    mulo = load_mulo(str(tmp_path / "run" / "mulo"))
    assert mulo.drafter.grid == (4, 4) and mulo.grid == (8, 8) and mulo.upsampler.vocab_size == 32
    mulo.check_matches(LlamaGen.from_pretrained(tmp_path / "gpt"))
    for part in ("drafter", "upsampler"):
        rows = [json.loads(line) for line in (tmp_path / "run" / part / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2]
        assert f"{tmp_path / 'run' / part}/log.jsonl" in printed  # the CLI names each part's log
