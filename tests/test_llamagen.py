import argparse

import pytest
import torch

from vargen.decoding import DecodeSession, SamplingConfig
from vargen.models import CheckpointError, LlamaGen
from vargen.models.rope import apply_rope, rope_2d_table, rope_factors

from conftest import make_gpt


def incremental_logits(model, cond, tokens, cond_mask=None):
    """Logits for every image position computed one token at a time through the static cache."""
    session = DecodeSession(model, cond, SamplingConfig(), cond_mask=cond_mask)
    P = session.prefix_len
    mask = None
    if cond_mask is not None:
        mask = torch.zeros(len(cond_mask), P, session.cache.max_len, dtype=torch.bool)
        causal = torch.ones(P, P, dtype=torch.bool).tril()
        mask[:, :, :P] = (causal & cond_mask[:, None, :]) | torch.eye(P, dtype=torch.bool)
    slots = torch.arange(P).expand(len(tokens), P)
    out = [model(embeds=session.prefix, positions=torch.full_like(slots, -1), slots=slots, mask=mask,
                 cache=session.cache)[:, -1]]
    if cond_mask is not None:
        session.cache.visible[:, :P] = cond_mask
    for k in range(tokens.shape[1] - 1):
        pos = torch.full((len(tokens), 1), k)
        out.append(model(tokens=tokens[:, k:k + 1], positions=pos, slots=pos + P, cache=session.cache)[:, -1])
    return torch.stack(out, 1)


def test_incremental_cache_matches_full_forward_c2i(c2i):
    tokens = torch.randint(0, c2i.vocab_size, (3, c2i.num_tokens))
    cond = torch.tensor([0, 2, 4])
    full = c2i.forward_train(tokens, cond, train=False)
    inc = incremental_logits(c2i, cond, tokens)
    assert full.shape == (3, 16, 48)
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-5)


def test_incremental_cache_matches_full_forward_t2i_with_padding(t2i):
    tokens = torch.randint(0, t2i.vocab_size, (2, t2i.num_tokens))
    caption = torch.randn(2, 6, 24)
    cond_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)  # left padding
    full = t2i.forward_train(tokens, caption, cond_mask=cond_mask, train=False)
    inc = incremental_logits(t2i, caption, tokens, cond_mask)
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-5)
    # the padding really is hidden: changing a padded caption row leaves the logits unchanged
    caption2 = caption.clone()
    caption2[0, :2] += 5.0
    torch.testing.assert_close(t2i.forward_train(tokens, caption2, cond_mask=cond_mask, train=False)[0], full[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_query_attention_matches_sdpa(dtype):
    from vargen.models.llamagen import single_query_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 6, n, 64) * 2 for n in (1, 40, 40))
    mask = torch.rand(2, 1, 1, 40) > 0.5
    mask[..., 0] = True  # the query always sees its own slot
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    reference = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    out = single_query_attention(q, k, v, mask)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's rounding only
    torch.testing.assert_close(out.float(), reference, atol=tol, rtol=tol)
    # no less accurate than SDPA's kernel in the same dtype
    assert (out.float() - reference).abs().max() <= (sdpa.float() - reference).abs().max() + 1e-5
    mask[0, ..., 1:] = False  # masked slots get no weight: only the first value is read
    torch.testing.assert_close(single_query_attention(q, k, v, mask)[0].float(), v[0, :, :1].float())


def test_parallel_forward_over_any_order_matches_raster(c2i):
    """Tokens fed in a permuted order at their true positions with a generation-order mask give the
    same logits as raster order when each token sees the same set of predecessors."""
    tokens = torch.randint(0, c2i.vocab_size, (1, c2i.num_tokens))
    session = DecodeSession(c2i, torch.tensor([1]), SamplingConfig())
    session.prefill()
    pos = torch.arange(16)[None]
    one_pass = session.forward(tokens, pos, pos)  # all 16 in one forward
    full = c2i.forward_train(tokens, torch.tensor([1]), train=False)
    torch.testing.assert_close(one_pass[:, :-1], full[:, 1:].softmax(-1), atol=1e-5, rtol=1e-5)


def test_rope_matches_complex_reference():
    grid, head_dim = 4, 16
    table = rope_2d_table(grid, head_dim)
    assert torch.all(table[0] == 0), "condition row must be zeros as in LlamaGen"
    half = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, half, 2).float() / half))
    for r, c in [(0, 0), (1, 3), (3, 2)]:
        angles = torch.cat([r * freqs, c * freqs])
        ref = torch.polar(torch.ones_like(angles), angles)
        got = table[1 + r * grid + c]
        torch.testing.assert_close(got[:, 0], ref.real)
        torch.testing.assert_close(got[:, 1], ref.imag)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rope_is_bitwise_the_pairwise_rotation(dtype):
    torch.manual_seed(0)
    table = rope_2d_table(4, 16).to(dtype)  # a bf16 model's buffer is bf16
    rows = table[torch.randint(0, 17, (2, 5))]  # [B, T, D/2, 2]
    x = (torch.randn(2, 5, 3, 16) * 3).to(dtype)
    xs, r = x.float().reshape(2, 5, 3, 8, 2), rows[:, :, None].float()
    want = torch.stack([xs[..., 0] * r[..., 0] - xs[..., 1] * r[..., 1],
                        xs[..., 1] * r[..., 0] + xs[..., 0] * r[..., 1]], -1).flatten(3).to(dtype)
    got = apply_rope(x, rope_factors(rows))
    assert got.dtype == dtype and torch.equal(got, want)
    assert not torch.equal(apply_rope(x, rope_factors(rows.flip(-1))), want)  # control: cos and sin swapped


def test_sizes_match_published_parameter_counts():
    # counting parameters on meta tensors: no memory, exact numbers
    with torch.device("meta"):
        b = LlamaGen.from_size("GPT-B")
        xl = LlamaGen.from_size("GPT-XL")
    assert round(sum(p.numel() for p in b.parameters()) / 1e6) == 111
    assert round(sum(p.numel() for p in xl.parameters()) / 1e6) == 775
    assert b.layers[0].feed_forward.w1.out_features == 2048


def _llamagen_layout_state(model):
    """The keys LlamaGen's own Transformer writes (its RoPE table is a plain attribute, not saved)."""
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_load_official_layout_pt_with_args_namespace(tmp_path, c2i):
    path = tmp_path / "c2i_tiny.pt"
    torch.save({"model": _llamagen_layout_state(c2i), "optimizer": {}, "steps": 7,
                "args": argparse.Namespace(gpt_model="GPT-tiny")}, path)
    loaded = LlamaGen.from_llamagen(path, size="GPT-tiny", block_size=16)
    assert loaded.config.num_classes == 5 and loaded.vocab_size == 48
    tokens = torch.randint(0, 48, (2, 16))
    torch.testing.assert_close(loaded.forward_train(tokens, torch.tensor([1, 3]), train=False),
                               c2i.forward_train(tokens, torch.tensor([1, 3]), train=False))


def test_load_raw_fsdp_dict_and_module_prefix(t2i):
    state = {f"module.{k}": v for k, v in _llamagen_layout_state(t2i).items()}
    state["freqs_cis"] = torch.zeros(3)  # stale RoPE buffers in old files are dropped
    loaded = LlamaGen.from_llamagen(state, size="GPT-tiny", block_size=16)
    assert loaded.config.model_type == "t2i" and loaded.config.cls_token_num == 6


def test_wrong_checkpoint_names_the_keys(c2i):
    state = _llamagen_layout_state(c2i)
    state["layers.0.attention.wq.weight"] = state.pop("layers.0.attention.wqkv.weight")
    with pytest.raises(CheckpointError) as err:
        LlamaGen.from_llamagen(state, size="GPT-tiny", block_size=16)
    msg = str(err.value)
    assert "layers.0.attention.wqkv.weight" in msg and "layers.0.attention.wq.weight" in msg


def test_wrong_size_names_the_files_size(c2i):
    with pytest.raises(CheckpointError, match="size: you gave 'GPT-mini' but the checkpoint's weights gives 'GPT-tiny'"):
        LlamaGen.from_llamagen(_llamagen_layout_state(c2i), size="GPT-mini", block_size=16)
    state = _llamagen_layout_state(c2i)
    state["layers.2.attention_norm.weight"] = torch.ones(64)  # a depth no named size has
    with pytest.raises(CheckpointError, match="shape mismatches|unexpected keys"):
        LlamaGen.from_llamagen(state, size="GPT-tiny", block_size=16)


def test_unknown_size_and_bad_block_size():
    with pytest.raises(ValueError, match="unknown GPT size 'GPT-Z'"):
        LlamaGen.from_size("GPT-Z")
    with pytest.raises(ValueError, match="square"):
        LlamaGen.from_size("GPT-tiny", block_size=15)


def test_training_mode_applies_condition_dropout():
    model = make_gpt("c2i", class_dropout_prob=1.0)
    labels = torch.tensor([0, 1, 2])
    null = model.condition_embeddings(labels, null=True)
    torch.testing.assert_close(null[0, 0], model.cls_embedding.embedding_table.weight[5])
    torch.testing.assert_close(model.cls_embedding(labels, train=True), null)
    assert not torch.allclose(model.cls_embedding(labels, train=False), null)


def test_prompt_too_long_is_rejected(t2i):
    with pytest.raises(ValueError, match="prompt too long: 7 caption tokens.*at most 6"):
        t2i.condition_embeddings(torch.randn(1, 7, 24))


def test_class_out_of_range_is_rejected(c2i):
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 5\)"):
        c2i.condition_embeddings(torch.tensor([5]))


def test_attention_reads_only_the_slots_in_use_and_gives_the_same_logits(c2i, monkeypatch):
    """On a CPU the cache's mask is cut to the slots written so far (StaticKVCache.in_use); the logits match the
    full-width mask's, and a cut that hid a written slot (the control) changes them."""
    from vargen.models.cache import StaticKVCache

    torch.manual_seed(0)
    tokens = torch.randint(0, c2i.vocab_size, (2, 12))
    pos = torch.arange(12).expand(2, -1)

    def run():
        cache = c2i.new_cache(2, max_len=c2i.prefix_len + 40)  # most of it never written
        prefix = c2i.condition_embeddings(torch.tensor([1, 3]))
        P = prefix.shape[1]
        c2i(embeds=prefix, positions=torch.full((2, P), -1), slots=torch.arange(P).expand(2, -1), cache=cache)
        c2i(tokens=tokens[:, :8], positions=pos[:, :8], slots=P + pos[:, :8], cache=cache)
        widths = []
        spy = cache.in_use
        cache.in_use = lambda mask, slots: widths.append(spy(mask, slots).shape[-1]) or spy(mask, slots)
        out = c2i(tokens=tokens[:, 8:], positions=pos[:, 8:], slots=P + pos[:, 8:], cache=cache)
        return out, widths, cache.max_len, P

    with torch.no_grad():
        cut, widths, max_len, P = run()
        assert widths == [P + 12] and max_len == P + 40  # the keys attention read: the 12 written slots only
        monkeypatch.setattr(StaticKVCache, "in_use", lambda self, mask, slots: mask)
        full, _, _, _ = run()
        torch.testing.assert_close(cut, full, atol=1e-5, rtol=1e-5)
        monkeypatch.setattr(StaticKVCache, "in_use", lambda self, mask, slots: mask[..., :P + 4])  # hides slots
        with pytest.raises(AssertionError):
            bad, _, _, _ = run()
            torch.testing.assert_close(bad, full, atol=1e-5, rtol=1e-5)


def test_copy_slots_moves_keys_and_values_and_skips_a_copy_onto_itself():
    from vargen.models.cache import StaticKVCache

    torch.manual_seed(0)
    cache = StaticKVCache.allocate(2, 2, 3, 8, 4)
    for buf in (*cache.k, *cache.v):
        buf.normal_()
    before = [buf.clone() for buf in (*cache.k, *cache.v)]
    same = torch.tensor([[2, 3], [4, 5]])
    cache.copy_slots(same, same)  # nothing moves (skipped on a CPU)
    assert all(torch.equal(a, b) for a, b in zip(before, (*cache.k, *cache.v)))
    cache.copy_slots(torch.tensor([[6, 3], [4, 7]]), same)  # sample 0: slot 6 -> 2; sample 1: slot 7 -> 5
    for a, b in zip(before, (*cache.k, *cache.v)):
        assert torch.equal(b[0, :, 2], a[0, :, 6]) and torch.equal(b[1, :, 5], a[1, :, 7])
        assert torch.equal(b[0, :, 3], a[0, :, 3]) and torch.equal(b[1, :, 4], a[1, :, 4])
        assert not torch.equal(b[0, :, 2], a[0, :, 2])  # control: the copy happened
