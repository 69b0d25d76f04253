"""The loop contract every registered method keeps (DecodeSession owns the bookkeeping).

One tiny 4 x 4-token model, every name in ``METHODS``, the same seeds: the statistics are defined once
(per-sample passes, accepted lengths, step compression) and the name a run records is the registry's.
"""
import pytest
import torch

from conftest import make_gpt
from vargen.decoding import SamplingConfig
from vargen.decoding.methods import METHODS, get_method
from vargen.models.eagle import EagleDrafter
from vargen.models.lpd import LPD
from vargen.models.mulo import MuLo, TokenUpsampler
from vargen.models.nar import NARModel

B, N, V = 3, 16, 48


@pytest.fixture(scope="module")
def parts():
    gpt = make_gpt("c2i", vocab=V, block=N, seed=0, grid_rows=4)
    torch.manual_seed(1)
    lpd = LPD.from_ar(gpt).eval()
    nar = NARModel.from_ar(gpt, head_layers=1).eval()
    eagle = EagleDrafter.from_target(gpt).eval()
    for p in eagle.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    codebook = torch.randn(V, 8)
    mulo = MuLo(make_gpt("c2i", vocab=V, block=4, seed=2, grid_rows=2),
                TokenUpsampler.from_codebook(codebook, (2, 2), 2, dim=16, blocks=1, groups=4).eval())
    return gpt, codebook, {"lpd": lpd, "nar": nar, "eagle": eagle, "mulo": mulo}


def _options(name, trained):
    base = name.split("+")[0]
    extra = {"steps": 6} if base == "lpd" else {}  # LPD's default 20 steps exceed 16 tokens
    return {"weights": trained[base], **extra} if base in trained else {}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_keeps_the_shared_statistics(parts, name, one_thread):
    gpt, codebook, trained = parts
    decode = get_method(name, codebook=codebook, **_options(name, trained))
    tokens, stats = decode(gpt, torch.arange(B) % 5, SamplingConfig(cfg_scale=2.0, top_k=20), seeds=[7, 8, 9])
    assert tokens.shape == (B, N) and 0 <= int(tokens.min()) and int(tokens.max()) < V
    passes = stats.per_sample_forward_passes
    assert len(passes) == B and min(passes) >= 1 and max(passes) <= stats.forward_passes
    hist = stats.accepted_hist
    assert sum(k * v for k, v in hist.items()) == B * N  # every token committed exactly once
    assert sum(hist.values()) == sum(passes)  # one entry per sample per target pass
    assert stats.step_compression == pytest.approx(N / (sum(passes) / B))
    assert stats.extra["step_compression"] == stats.step_compression == stats.to_dict()["step_compression"]
    assert stats.method == name  # the registry's name, recorded by the decode loop itself


def test_method_names_agree_between_the_loop_and_the_cli_flags():
    from vargen.decoding.methods import compose_method
    from vargen.decoding.speculative import sjd_method_name

    for coupling in ("none", "maximal", "gumbel"):
        for relax in ("none", "lantern"):
            try:
                name = compose_method("sjd", coupling, relax)
            except ValueError:
                continue
            assert name in METHODS and name == sjd_method_name(coupling, "exact" if relax == "none" else relax)
    assert compose_method("sjd", "none", "gsd") == sjd_method_name("none", "gsd") == "gsd"


def test_finishing_with_uncommitted_tokens_is_a_contract_error(one_thread):
    from vargen.decoding.session import DecodeSession

    gpt = make_gpt("c2i", vocab=V, block=N)
    session = DecodeSession(gpt, torch.arange(2), SamplingConfig())
    session.prefill()
    session.advance(torch.ones(2, dtype=torch.long))
    with pytest.raises(RuntimeError, match="1, 1"):
        session.finish()


@pytest.mark.parametrize("kind", ["llamagen", "lpd", "nar", "janus", "emu3", "lumina", "prefix", "compiled"])
def test_every_model_implements_the_protocol_the_session_checks(parts, kind):
    from test_hf_models import make_adapter

    from vargen.models import PrefixModel
    from vargen.models.compiled import CompiledModel
    from vargen.models.protocol import ARImageModel, check_model

    gpt, _, trained = parts
    model = {"llamagen": lambda: gpt, "lpd": lambda: trained["lpd"], "nar": lambda: trained["nar"],
             "janus": lambda: make_adapter("janus"), "emu3": lambda: make_adapter("emu3"),
             "lumina": lambda: make_adapter("lumina"),
             "prefix": lambda: PrefixModel(make_gpt("c2i", block=8, grid_rows=1), 4),
             "compiled": lambda: CompiledModel(gpt)}[kind]()
    assert isinstance(model, ARImageModel)
    check_model(model)  # attributes and the forward arguments the methods pass


def test_the_session_refuses_a_model_outside_the_protocol():
    from vargen.decoding.session import DecodeSession

    class NotAModel:
        grid, num_tokens, vocab_size = (2, 2), 4, 8

    with pytest.raises(TypeError, match="missing prefix_len, has_null_condition, parameters"):
        DecodeSession(NotAModel(), torch.arange(1), SamplingConfig())
