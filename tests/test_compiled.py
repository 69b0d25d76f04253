"""Compiled decoding: same tokens as eager, one graph per step shape, no recompilation across steps."""
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from conftest import make_gpt
from vargen.decoding import SamplingConfig, decode_ar, decode_sjd, decode_zipar
from vargen.models.compiled import CompiledModel, compile_model

SAMPLING = SamplingConfig(cfg_scale=2.0)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_steps_compile_once_per_shape_and_never_recompile(fresh_dynamo):
    model = make_gpt("c2i")
    compiled = CompiledModel(model, backend="eager")
    cond = torch.tensor([0, 1, 2])
    for decode, kw in ((decode_ar, {}), (decode_sjd, {"window": 4}), (decode_zipar, {"window": 2})):
        ref, _ = decode(model, cond, SAMPLING, seeds=[0, 1, 2], **kw)
        out, _ = decode(compiled, cond, SAMPLING, seeds=[0, 1, 2], **kw)
        assert torch.equal(ref, out), decode.__name__
    graphs = counters["stats"]["unique_graphs"]
    assert graphs <= 4  # [B, 1] AR steps, SJD's whole verify step, ZipAR's pass (its first shape, then symbolic)
    with torch._dynamo.config.patch(error_on_recompile=True):  # other classes and seeds: same graphs
        decode_ar(compiled, torch.tensor([3, 4, 0]), SAMPLING, seeds=[7, 8, 9])
        decode_sjd(compiled, torch.tensor([3, 4, 0]), SAMPLING, seeds=[7, 8, 9], window=4)
    assert counters["stats"]["unique_graphs"] == graphs


def test_many_methods_share_one_compiled_model_without_falling_back_to_eager(fresh_dynamo):
    """Every method and step shape gets its own graph: more than dynamo's default limit of 8, after which it
    would silently run the rest eagerly (here: an error instead)."""
    from vargen.decoding import get_method
    from vargen.decoding.options import method_options

    compiled = CompiledModel(make_gpt("c2i"), backend="eager")
    cond, codebook = torch.tensor([0, 1]), torch.randn(compiled.vocab_size, 4)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for name in ("ar", "sjd", "sjd+coupling", "sjd+pac", "zipar", "zipar-adaptive", "pjd", "sjd+lantern"):
            for window in (2, 3) if "window" in method_options(name) else (None,):
                options = {} if window is None else {"window": window}
                get_method(name, codebook=codebook, **options)(compiled, cond, SAMPLING, seeds=[0, 1])
    assert counters["stats"]["unique_graphs"] > 8


def test_cache_buffers_are_reused_and_reset():
    compiled = CompiledModel(make_gpt("c2i"), backend="eager")
    a = compiled.new_cache(2, 20)
    a.length.fill_(5)
    a.visible[:, :5] = True
    b = compiled.new_cache(2, 20)
    assert b is a and int(b.length.sum()) == 0 and not bool(b.visible.any())
    assert compiled.new_cache(3, 20) is not a
    assert compile_model(compiled) is compiled


def test_inductor_gives_the_eager_tokens(fresh_dynamo):
    """The real code path (inductor; CUDA graphs only on a GPU): AR and SJD tokens match eager exactly."""
    model = make_gpt("c2i")
    compiled = compile_model(model)  # inductor, reduce-overhead
    cond = torch.tensor([0, 4])
    for decode, kw in ((decode_ar, {}), (decode_sjd, {"window": 3})):
        ref, _ = decode(model, cond, SAMPLING, seeds=[3, 4], **kw)
        out, _ = decode(compiled, cond, SAMPLING, seeds=[3, 4], **kw)
        assert torch.equal(ref, out), decode.__name__


def test_pipeline_and_cli_compile(fresh_dynamo, tmp_path):
    from vargen.cli import build_parser
    from vargen.pipeline import tiny_random_pipeline

    pipe = tiny_random_pipeline()
    ref = pipe([0, 1], output_type="latent", progress=False).images
    pipe.enable_compile(backend="eager")
    assert isinstance(pipe.decode_model, CompiledModel) and pipe.decode_model.model is pipe.gpt
    assert torch.equal(pipe([0, 1], output_type="latent", progress=False).images, ref)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "0", "--compile", "fastest"])
    args = build_parser().parse_args(["generate", "0", "--compile"])
    assert args.compile == "reduce-overhead"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_match_eager_logits_and_decode(fresh_dynamo):
    """Replayed CUDA graphs on the pooled cache compute eager's logits (fp32 tolerance; inductor's fused
    kernels round differently, so tokens are compared through the logits, not sampled paths)."""
    model = make_gpt("c2i").cuda()
    compiled = compile_model(model, "reduce-overhead")
    cond = torch.tensor([0, 4], device="cuda")
    for rep in range(3):  # record, then replay
        caches = [m.new_cache(2, model.prefix_len + model.num_tokens) for m in (model, compiled)]
        prefix = model.condition_embeddings(cond)
        slots = torch.zeros(2, 1, dtype=torch.long, device="cuda")
        for m, cache in zip((model, compiled), caches):
            m(embeds=prefix, positions=torch.full_like(slots, -1), slots=slots, cache=cache)
        tokens = torch.randint(0, model.vocab_size, (2, model.num_tokens), device="cuda",
                               generator=torch.Generator("cuda").manual_seed(rep))
        for k in range(model.num_tokens - 1):
            step = torch.full((2, 1), k, device="cuda")
            a = model(tokens=tokens[:, k:k + 1], positions=step, slots=step + 1, cache=caches[0])
            b = compiled(tokens=tokens[:, k:k + 1], positions=step, slots=step + 1, cache=caches[1])
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for decode, kw in ((decode_ar, {}), (decode_sjd, {"window": 4})):
        for _ in range(2):
            out, stats = decode(compiled, cond, SAMPLING, seeds=[3, 4], **kw)
            assert out.shape == (2, model.num_tokens) and int(out.max()) < model.vocab_size


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="weight prepacking needs oneDNN")
def test_inductor_on_cpu_prepacks_the_weights(fresh_dynamo, monkeypatch):
    """On a CPU without vargen's kernel (here disabled) the compiled step freezes the weights so inductor runs its
    linears on prepacked oneDNN weights (fp32 tokens equal eager's, test above)."""
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setenv("VARGEN_NO_EXT", "1")
    model = make_gpt("c2i").to(torch.bfloat16)
    compiled = compile_model(model, "default")
    cond = torch.tensor([0, 4, 2])
    decode_ar(compiled, cond, SAMPLING, seeds=[3, 4, 5])  # compiles
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        decode_ar(compiled, cond, SAMPLING, seeds=[3, 4, 5])
    names = {e.key for e in prof.key_averages()}
    assert "mkldnn::_linear_pointwise" in names, sorted(n for n in names if "mm" in n or "linear" in n)
    assert "vargen_cpu::stream_linear" not in names


@pytest.mark.parametrize("batch", [1, 3])
def test_compiled_steps_call_the_cpu_kernel(fresh_dynamo, batch):
    """Compiled steps (batch 1 under CFG: 2 rows; batch 3: 6) call vargen's CPU kernels from inside the graph, as
    dispatcher ops: the matmul on weights laid out for it when the model was wrapped (vargen.models.linear), and
    the attention."""
    from torch.profiler import ProfilerActivity, profile

    from vargen.ops import cpu_kernels

    if cpu_kernels.kernels() is None:
        pytest.skip(f"CPU kernels not in use: {cpu_kernels.status()}")
    model = make_gpt("c2i").to(torch.bfloat16)
    compiled = compile_model(model, "default")
    cond = torch.tensor([1, 4, 2][:batch])
    seeds = [7, 8, 9][:batch]
    eager, _ = decode_ar(model, cond, SAMPLING, seeds=seeds)
    decode_ar(compiled, cond, SAMPLING, seeds=seeds)  # compiles
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out, _ = decode_ar(compiled, cond, SAMPLING, seeds=seeds)
    calls = {e.key: e.count for e in prof.key_averages()}
    layers = len(model.layers)
    # every linear of every image step: wqkv, wo, w1, w3, w2 per layer and the head
    assert calls.get("vargen_cpu::stream_linear", 0) == (5 * layers + 1) * (model.num_tokens - 1), calls
    assert calls.get("vargen_cpu::attention", 0) == layers * (model.num_tokens - 1), calls  # and its attention
    assert out.shape == eager.shape


def test_sjd_steps_compile_whole_and_match_eager(fresh_dynamo):
    """--compile captures SJD's whole verify step (forward, acceptance, commit, rollback, redraws, coupling, next
    window; SJD-PAC's tree) as one graph: tokens equal eager's for every coupling, PAC and LANTERN, one graph per
    variant, and other classes and seeds reuse it without recompiling. The sampling inits draw inside the step
    and stay eager around the compiled forward (same tokens too)."""
    from vargen.decoding import get_method

    model = make_gpt("c2i")
    compiled = CompiledModel(model, backend="aot_eager")
    codebook = torch.randn(model.vocab_size, 4)
    cond, other = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 0])
    variants = ("sjd", "sjd+coupling", "sjd+gumbel", "sjd+lantern", "sjd+pac", "sjd+coupling+pac")
    for name in variants:
        decode = get_method(name, codebook=codebook, window=4)
        ref, ref_stats = decode(model, cond, SAMPLING, seeds=[0, 1, 2])
        out, stats = decode(compiled, cond, SAMPLING, seeds=[0, 1, 2])
        assert torch.equal(ref, out) and stats.extra["whole_step_graph"], name
        assert stats.forward_passes == ref_stats.forward_passes and stats.per_sample_forward_passes == \
            ref_stats.per_sample_forward_passes
        assert not ref_stats.extra["whole_step_graph"]
    graphs = counters["stats"]["unique_graphs"]
    assert graphs <= len(variants) + 1  # one whole step per variant (+ at most the eager-wrapper forward)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for name in variants:
            get_method(name, codebook=codebook, window=4)(compiled, other, SAMPLING, seeds=[7, 8, 9])
    assert counters["stats"]["unique_graphs"] == graphs
    for name in ("sjd+coupling", "sjd+coupling+pac"):  # a window wider than a row (grid width 4) copies within it
        decode = get_method(name, codebook=codebook, window=9)
        ref, _ = decode(model, cond, SAMPLING, seeds=[0, 1, 2])
        out, stats = decode(compiled, cond, SAMPLING, seeds=[0, 1, 2])
        assert torch.equal(ref, out) and stats.extra["whole_step_graph"], name
    for name, options in (("sjd", {"init": "random"}), ("sjd+pac", {"init": "left-dist"})):
        decode = get_method(name, codebook=codebook, window=4, **options)
        ref, _ = decode(model, cond, SAMPLING, seeds=[0, 1, 2])
        out, stats = decode(compiled, cond, SAMPLING, seeds=[0, 1, 2])
        assert torch.equal(ref, out) and not stats.extra["whole_step_graph"], name


def test_lpd_nar_and_zipar_passes_compile_whole_and_match_eager(fresh_dynamo):
    """--compile reaches LPD's and NAR's own models: each pass (forward, ramped guidance, sampling) is one graph
    of the companion wrapper, and ZipAR's pass one graph of the GPT's; tokens equal eager's, the changing group /
    diagonal / active-row counts become symbolic after the first recompile (fewer graphs than step shapes), and
    other classes and seeds recompile nothing."""
    from vargen.decoding import decode_lpd, decode_nar
    from vargen.models.lpd import LPD
    from vargen.models.nar import NARModel

    model = make_gpt("c2i")
    lpd, nar = LPD.from_ar(model).eval(), NARModel.from_ar(model, head_layers=1).eval()
    compiled = CompiledModel(model, backend="aot_eager")
    cond, other = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 0])
    runs = ((decode_lpd, {"weights": lpd, "steps": 8}), (decode_nar, {"weights": nar}), (decode_zipar, {"window": 2}))
    shapes = 0
    for decode, kw in runs:
        ref, ref_stats = decode(model, cond, SAMPLING, seeds=[0, 1, 2], **kw)
        out, stats = decode(compiled, cond, SAMPLING, seeds=[0, 1, 2], **kw)
        assert torch.equal(ref, out) and stats.extra["whole_step_graph"], decode.__name__
        assert not ref_stats.extra["whole_step_graph"] and stats.forward_passes == ref_stats.forward_passes
        shapes += stats.forward_passes - 1
    graphs = counters["stats"]["unique_graphs"]
    assert graphs < shapes / 2, (graphs, shapes)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for decode, kw in runs:
            decode(compiled, other, SAMPLING, seeds=[7, 8, 9], **kw)
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("method, variants", [
    ("pjd", ({"window": 3, "rows": 2, "lead": 1}, {"window": 5, "rows": 3})),
    ("zipar-adaptive", ({"window": 2}, {"window": 4, "min_window": 1})),
])
def test_pjd_and_adaptive_zipar_steps_compile_whole_and_match_eager(fresh_dynamo, method, variants):
    """PJD's whole pass (row windows, the row-causal forward, per-row verification, commit, Jacobi refill) and
    adaptive ZipAR's (row roles, forward, advance, start / check / restart with its cache hiding) are one
    fixed-shape graph each: tokens and per-sample pass counts equal eager's, and other classes and seeds
    recompile nothing."""
    from vargen.decoding import get_method

    model = make_gpt("c2i")
    compiled = CompiledModel(model, backend="aot_eager")
    cond = torch.tensor([0, 1, 2])
    for kw in variants:
        decode = get_method(method, **kw)
        ref, ref_stats = decode(model, cond, SAMPLING, seeds=[0, 1, 2])
        out, stats = decode(compiled, cond, SAMPLING, seeds=[0, 1, 2])
        assert torch.equal(ref, out) and stats.extra["whole_step_graph"] and not ref_stats.extra["whole_step_graph"]
        assert stats.per_sample_forward_passes == ref_stats.per_sample_forward_passes
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        get_method(method, **variants[-1])(compiled, torch.tensor([3, 4, 0]), SAMPLING, seeds=[7, 8, 9])
    assert counters["stats"]["unique_graphs"] == graphs
