"""Precision as an option: the generator in bf16 / fp32, probabilities and acceptance in fp32, refused where it
cannot run; SJD stays exact in bf16."""
import pytest
import torch
from conftest import make_gpt
from test_speculative import N_SAMPLES, SHARP, chi_square_p, exact_distribution

from vargen.cli import main
from vargen.decoding import decode_sjd
from vargen.errors import UsageError
from vargen.pipeline import VarGenPipeline
from vargen.precision import native_bf16, resolve_dtype


def test_auto_is_bf16_exactly_where_the_hardware_runs_it():
    assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if native_bf16("cpu") else torch.float32)
    assert resolve_dtype("fp32") == torch.float32 and resolve_dtype(torch.bfloat16) == torch.bfloat16
    with pytest.raises(UsageError, match="fp16 has no fast matmuls on a CPU"):
        resolve_dtype("fp16", "cpu")
    with pytest.raises(UsageError, match="dtype must be one of"):
        resolve_dtype("int8")


def test_the_pipeline_runs_the_generator_in_its_dtype_and_samples_in_fp32(one_thread):
    pipe = VarGenPipeline.load("tiny-random", torch_dtype="bf16")
    assert next(pipe.gpt.parameters()).dtype == torch.bfloat16
    assert next(pipe.vq.parameters()).dtype == torch.float32  # one decode per image: kept exact
    out = pipe([1, 2], seed=0, output_type="pt", progress=False)
    assert out.images.dtype == torch.float32 and out.tokens.shape == (2, 64)
    probs = pipe.gpt(tokens=out.tokens[:, :3], positions=torch.arange(3).expand(2, 3),
                     slots=torch.arange(3).expand(2, 3), cache=pipe.gpt.new_cache(2))
    assert probs.dtype == torch.float32  # logits leave the bf16 model as fp32
    assert VarGenPipeline.load("tiny-random").gpt.output.weight.dtype == torch.float32  # diffusers' default


@pytest.mark.parametrize("coupling", ["none", "maximal"])
def test_sjd_is_exact_with_a_bf16_generator(coupling, one_thread):
    """Lossless relative to the bf16 model's own distributions (computed in fp32 from its logits)."""
    small = torch.nn.Module.to(make_gpt("c2i", vocab=4, block=4, seed=3), dtype=torch.bfloat16)
    expected = exact_distribution(small, 1, SHARP)
    tokens, _ = decode_sjd(small, torch.full((N_SAMPLES,), 1), SHARP, seeds=range(N_SAMPLES), window=3,
                           init="random", coupling=coupling)
    assert chi_square_p(tokens, expected, 4) > 1e-3


def test_cli_dtype_is_honoured_or_refused(tmp_path, capsys, one_thread):
    stats = tmp_path / "s.json"
    assert main(["generate", "class1", "--model", "tiny-random", "--dtype", "fp32", "-o", str(tmp_path / "a.png"),
                 "--quiet", "--stats", str(stats)]) == 0
    assert main(["generate", "class1", "--model", "tiny-random", "--dtype", "fp16", "-o", str(tmp_path / "b.png"),
                 "--quiet"]) == 2
    assert "fp16 has no fast matmuls on a CPU" in capsys.readouterr().err
    assert not (tmp_path / "b.png").exists()
