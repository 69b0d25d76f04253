"""Hugging Face AR image models (Janus, Emu3, Chameleon/Lumina-mGPT/Anole) behind vargen's protocol.

Every model is a tiny random config built here. The reference is always the HF model's
own full-sequence forward without a cache (separators inserted after every row).
"""
import random

import pytest
import torch

from vargen.decoding import SamplingConfig, decode_ar, decode_sjd, decode_zipar
from vargen.models.hf import (ChameleonImageModel, Emu3ImageModel, JanusImageModel, load_hf_image_model)

FAMILIES = ["janus", "emu3", "lumina", "anole"]
V = 16  # image codes
TOL = 1e-4


def _janus(attn):
    from transformers import JanusConfig, JanusForConditionalGeneration

    text = dict(model_type="llama", vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cfg = JanusConfig(
        text_config=text, image_token_id=39,
        vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8,
                           projection_dim=32, depth=1, num_image_tokens=16),
        vq_config=dict(embed_dim=8, num_embeddings=V, latent_channels=32, base_channels=32, channel_multiplier=[1, 2],
                       num_res_blocks=1, projection_dim=32, image_token_embed_dim=32, num_hidden_layers=2))
    cfg._attn_implementation = attn
    model = JanusForConditionalGeneration(cfg)
    # what Janus-Pro's generation_config.json carries
    model.generation_config.bos_token_id, model.generation_config.pad_token_id = 1, 3
    model.generation_config.generation_kwargs = {"boi_token_id": 4}
    model.generation_config._from_model_config = False  # else save/load drops generation_kwargs
    return model


def _emu3(attn):
    from transformers import Emu3Config, Emu3ForConditionalGeneration

    vocab = {f"t{i}": i for i in range(40)}
    ids = list(range(40, 40 + V))
    random.Random(0).shuffle(ids)  # image ids out of code order: nothing may assume a range
    vocab.update({f"<|visual token{c:06d}|>": ids[c] for c in range(V)})
    vocab.update({"<|extra_200|>": 60, "<image>": 61, "<|image start|>": 62, "<|image token|>": 63,
                  "<|image end|>": 64, "<|extra_201|>": 65})
    cfg = Emu3Config(
        vocabulary_map=vocab,
        text_config=dict(vocab_size=70, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2),
        vq_config=dict(codebook_size=V, embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1, 2],
                       num_res_blocks=1, attn_resolutions=[], hidden_size=64, num_attention_heads=1))
    cfg._attn_implementation = attn
    return Emu3ForConditionalGeneration(cfg)


def _chameleon(attn):
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    def name(code):  # Chameleon spells image codes with letters: 12 -> IMGIMGBCZ
        return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"

    vocab = {f"t{i}": i for i in range(4)}
    vocab.update({name(c): 4 + c for c in range(V)})
    vocab.update({"<image>": 30, "<racm3:break>": 31, "<eoss>": 32, "<reserved08799>": 33, "<reserved08706>": 42})
    vocab.update({f"<reserved{8800 + n:05d}>": 34 + n for n in range(8)})
    cfg = ChameleonConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          vocabulary_map=vocab,
                          vq_config=dict(embed_dim=8, num_embeddings=V, latent_channels=32, resolution=32,
                                         base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1))
    cfg._attn_implementation = attn
    return ChameleonForConditionalGeneration(cfg)


def make_adapter(family, attn="sdpa", seed=0):
    """The family's adapter on a tiny random model: Janus 4 x 4 tokens, the others 3 x 4."""
    torch.manual_seed(seed)
    if family == "janus":
        return JanusImageModel(_janus(attn), max_prompt_len=16)
    if family == "emu3":
        return Emu3ImageModel(_emu3(attn), grid=(3, 4), max_prompt_len=16, negative_prompt_ids=[7, 8, 9, 10])
    sep = "lumina" if family == "lumina" else None  # anole: Chameleon without row separators
    return ChameleonImageModel(_chameleon(attn), grid=(3, 4), row_separator=sep, max_prompt_len=16)


def prompts(family):
    """Two prompts of different lengths, each ending with the family's image header."""
    if family == "janus":
        return [[1, 11, 12, 13, 4], [1, 14, 15, 16, 17, 18, 4]]  # BOS text BOI
    if family == "emu3":
        return [[1, 20, 21, 62, 33, 34, 33, 63], [1, 22, 62, 33, 34, 33, 63]]  # BOS text BOI "3*4" IMG
    return [[1, 2, 3, 2, 31, 35, 36], [1, 3, 2, 31, 35, 36]]  # BOS text BOI h w


def null_prompt(family, row):
    """The unconditional prompt each model defines, written out independently of the adapter."""
    if family == "janus":
        return [t if t in (1, 4) else 3 for t in row]
    if family == "emu3":
        return [1, 7, 8, 9, 10] + row[row.index(62):]
    return row[row.index(31):]


@torch.no_grad()
def reference(model, row, codes):
    """HF full forward (no cache) on ``row`` + image: ``(first [V], after [N, V])``, where ``after[k]``
    predicts the token following cell ``k`` (at the separator for a row's last cell)."""
    hf, (H, W) = model.hf, model.grid
    sep = int(model.separators)
    if isinstance(model, JanusImageModel):
        x = torch.cat([model.embed_text(torch.tensor([row])),
                       hf.prepare_embeddings_for_image_generation(codes[None])], 1)
        logits = hf.model.generation_head(hf.model.language_model(inputs_embeds=x).last_hidden_state)[0]
    else:
        seq = list(row)
        for r in range(H):
            seq += model.image_ids[codes[r * W:(r + 1) * W]].tolist() + ([model.separator_id] if sep else [])
        ids = torch.tensor([seq])
        if isinstance(model, Emu3ImageModel):
            logits = hf(input_ids=ids).logits[0]
        else:  # Chameleon's forward masks image tokens (chat checkpoints); its lm_head on the decoder output
            logits = hf.lm_head(hf.model(input_ids=ids).last_hidden_state)[0]
        logits = logits[:, model.image_ids]
    P = len(row)
    k = torch.arange(H * W)
    at = P + (k // W) * (W + sep) + k % W + sep * (k % W == W - 1).long()
    return logits[P - 1].float(), logits[at].float()


def prefill(model, cond_rows, null_rows=None, extra=0):
    """Prefill like DecodeSession: returns ``(cache, P, first-token logits)``."""
    emb = model.condition_embeddings({"input_ids": cond_rows})
    if null_rows is not None:
        emb = torch.cat([emb, model.condition_embeddings({"input_ids": cond_rows}, null=True)])
    B, P = emb.shape[:2]
    cache = model.new_cache(B, P + model.num_tokens + extra)
    slots = torch.arange(P).expand(B, P)
    with torch.no_grad():
        logits = model(embeds=emb, positions=torch.full_like(slots, -1), slots=slots, cache=cache)
    cache.length.fill_(P)
    return cache, P, logits[:, -1]


def step(model, cache, codes, positions, slots, mask=None):
    with torch.no_grad():
        return model(tokens=codes, positions=positions, slots=slots, mask=mask, cache=cache)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_raster_steps_match_full_forward(family, attn):
    """Prefill + one token per forward (with CFG null rows and left padding) equals the full forward."""
    model = make_adapter(family, attn)
    rows = prompts(family)
    all_rows = rows + [null_prompt(family, r) for r in rows]
    B, N = len(all_rows), model.num_tokens
    codes = torch.randint(0, V, (len(rows), N))
    codes = torch.cat([codes, codes])  # CFG halves share image tokens
    cache, P, first = prefill(model, rows, null_rows=True)
    got = []
    for k in range(N):
        pos = torch.full((B, 1), k)
        got.append(step(model, cache, codes[:, k:k + 1], pos, pos + P)[:, 0])
    got = torch.stack(got, 1)
    for b, row in enumerate(all_rows):
        ref_first, ref_after = reference(model, row, codes[b])
        torch.testing.assert_close(first[b], ref_first, atol=TOL, rtol=0)
        torch.testing.assert_close(got[b], ref_after, atol=TOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_out_of_order_slots_and_chunks(family):
    """Cells fed in shuffled chunks that cross rows, at slots that are not in raster order,
    under an explicit raster-causal mask: every cell's logits equal the full forward's."""
    model = make_adapter(family)
    rows = prompts(family)
    B, N = len(rows), model.num_tokens
    codes = torch.randint(0, V, (B, N))
    cache, P, _ = prefill(model, rows)
    gen = torch.Generator().manual_seed(1)
    slot_of = P + torch.randperm(N, generator=gen)  # cell k lives at slot slot_of[k]
    written = torch.zeros(cache.max_len, dtype=torch.bool)
    written[:P] = True
    got = torch.zeros(B, N, model.vocab_size)
    start, sizes = 0, [3, 1, 5, 2, 4, 1, 6]
    for size in sizes:
        cells = torch.arange(start, min(start + size, N))
        start += len(cells)
        cells = cells[torch.randperm(len(cells), generator=gen)]  # input order inside a chunk is free too
        slots = slot_of[cells]
        written[slots] = True
        # raster-causal: the prompt and every written cell at or before the query's cell
        cell_at_slot = torch.full((cache.max_len,), -1)
        cell_at_slot[slot_of] = torch.arange(N)
        sees = written & ((cell_at_slot[None, :] <= cells[:, None]) | (torch.arange(cache.max_len) < P))
        out = step(model, cache, codes[:, cells], cells.expand(B, -1), slots.expand(B, -1), sees.expand(B, -1, -1))
        got[:, cells] = out
        if start >= N:
            break
    assert start == N
    for b, row in enumerate(rows):
        torch.testing.assert_close(got[b], reference(model, row, codes[b])[1], atol=TOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_rollback_then_refeed(family):
    """SJD-like: a window of wrong drafts across a row end, rollback, the true window, then windows
    running past the last cell (clamped positions): logits equal the full forward's."""
    model = make_adapter(family)
    rows = prompts(family)
    B, N, L = len(rows), model.num_tokens, 4
    codes = torch.randint(0, V, (B, N))
    cache, P, _ = prefill(model, rows, extra=L)
    got = torch.zeros(B, N, model.vocab_size)
    k = 2  # cells 0..1 committed; the window k..k+L-1 holds the end of row 0 (W = 4)
    pos = torch.arange(k).expand(B, -1)
    got[:, :k] = step(model, cache, codes[:, :k], pos, pos + P)
    window = torch.arange(k, k + L).expand(B, -1)
    wrong = (codes[:, k:k + L] + 1) % V
    step(model, cache, wrong, window, window + P)
    cache.rollback(torch.full((B,), P + k))
    got[:, k:k + L] = step(model, cache, codes[:, k:k + L], window, window + P)
    n = k + L
    while n < N:  # windows as SJD feeds them: slots past the end carry the last cell as padding
        slots = torch.arange(n, n + L)
        valid = slots < N
        cells = slots.clamp(max=N - 1)
        out = step(model, cache, codes[:, cells], cells.expand(B, -1), (slots + P).expand(B, -1))
        got[:, cells[valid]] = out[:, valid]
        n += int(valid.sum())
        cache.rollback(torch.full((B,), P + n))
    for b, row in enumerate(rows):
        torch.testing.assert_close(got[b], reference(model, row, codes[b])[1], atol=TOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_decoding_methods_end_to_end(family):
    """AR, SJD (window 4) and ZipAR run with CFG; greedy AR == SJD == ZipAR(window = W)."""
    model = make_adapter(family)
    cond = {"input_ids": prompts(family)}
    N = model.num_tokens
    sampled = SamplingConfig(cfg_scale=3.0, temperature=1.0)
    for tokens, _ in (decode_ar(model, cond, sampled, seeds=[0, 1]), decode_sjd(model, cond, sampled, window=4),
                      decode_zipar(model, cond, sampled, window=2)):
        assert tokens.shape == (2, N) and tokens.min() >= 0 and tokens.max() < model.vocab_size
    greedy = SamplingConfig(cfg_scale=3.0, temperature=0.0)
    ar, _ = decode_ar(model, cond, greedy)
    sjd, _ = decode_sjd(model, cond, greedy, window=4)
    assert torch.equal(ar, sjd)
    zipar, _ = decode_zipar(model, cond, greedy, window=model.grid[1])  # no proxies: exactly AR
    assert torch.equal(ar, zipar)


def test_compiled_steps_match_eager():
    """Under torch.compile (fullgraph, eager backend) separators keep static shapes: same greedy tokens."""
    import torch._dynamo

    from vargen.models.compiled import CompiledModel

    model = make_adapter("lumina")
    cond = {"input_ids": prompts("lumina")}
    greedy = SamplingConfig(cfg_scale=3.0, temperature=0.0)
    torch._dynamo.reset()
    try:
        compiled = CompiledModel(model, mode="default", backend="eager")
        for decode, kw in ((decode_ar, {}), (decode_sjd, {"window": 4})):
            assert torch.equal(decode(model, cond, greedy, **kw)[0], decode(compiled, cond, greedy, **kw)[0])
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_and_load(family, tmp_path):
    model = make_adapter(family)
    model.hf.save_pretrained(tmp_path)
    kwargs = {"janus": {}, "emu3": dict(grid=(3, 4)), "lumina": dict(grid=(3, 4), row_separator="lumina"),
              "anole": dict(grid=(3, 4))}[family]
    loaded = load_hf_image_model(tmp_path, local_files_only=True, dtype=torch.float32, max_prompt_len=16, **kwargs)
    assert type(loaded) is type(model) and loaded.grid == model.grid and loaded.vocab_size == model.vocab_size
    assert loaded.has_null_condition == model.has_null_condition
    rows = prompts(family)
    codes = torch.randint(0, V, (2, model.num_tokens))
    outs = []
    for m in (model, loaded):
        cache, P, first = prefill(m, rows)
        pos = torch.arange(model.num_tokens).expand(2, -1)
        outs.append((first, step(m, cache, codes, pos, pos + P)))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_unsupported_model_type_and_missing_config(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="'llama' is not supported.*chameleon, emu3, janus"):
        load_hf_image_model(tmp_path / "llama")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_image_model(tmp_path / "empty")


def test_decode_tokens():
    for family, side in (("janus", 8), ("emu3", None)):
        model = make_adapter(family)
        images = model.decode_tokens(torch.randint(0, V, (2, model.num_tokens)))
        H, W = model.grid
        assert images.shape[:2] == (2, 3) and images.shape[2] * W == images.shape[3] * H
        assert images.min() >= 0 and images.max() <= 1
        if side:
            assert images.shape[-1] == side
    with pytest.raises(NotImplementedError, match="VQGAN"):
        make_adapter("lumina").decode_tokens(torch.zeros(1, 12, dtype=torch.long))


def test_prompt_validation_and_helpers():
    model = make_adapter("emu3")
    with pytest.raises(ValueError, match="image header"):
        model.condition_embeddings({"input_ids": [[1, 20, 21]]})
    with pytest.raises(ValueError, match="max_prompt_len"):
        model.condition_embeddings({"input_ids": [[1] + [20] * 30 + [62, 33, 34, 33, 63]]})
    janus = make_adapter("janus")
    with pytest.raises(ValueError, match="end with the begin-of-image"):
        janus.condition_embeddings(torch.tensor([[1, 11, 12]]))
    # attention_mask padding is dropped: a padded batch embeds like its rows one by one
    padded = {"input_ids": torch.tensor([[0, 0, 1, 11, 4], [1, 11, 12, 13, 4]]),
              "attention_mask": torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])}
    emb = janus.condition_embeddings(padded)
    assert torch.isnan(emb[0, :2]).all() and torch.isfinite(emb[0, 2:]).all() and torch.isfinite(emb[1]).all()
    # Lumina-mGPT's prompt: template text, then BOI and the size tokens (32 px per size step)
    lumina = ChameleonImageModel(_chameleon("sdpa"), grid=(4, 6), row_separator="lumina")
    seen = []

    def tokenizer(text):
        seen.append(text)
        return {"input_ids": [1, 2, 3]}

    ids = lumina.prompt_ids("a cat", tokenizer)["input_ids"][0]
    assert seen == ["Generate an image of 96x64 according to the following prompt:\na cat<reserved08706>"]
    vocab = lumina.vocabulary_map
    assert ids == [1, 2, 3, vocab["<racm3:break>"], vocab["<reserved08802>"], vocab["<reserved08803>"]]
