"""The latency table: per-step timing of every method's real loop, ratios against AR and the bandwidth floor."""
import json

import pytest
import torch

from vargen.cli import main
from vargen.eval.latency import (bench_latency, copy_bandwidth, depends_on_acceptance, matmul_parameters, matmul_peak,
                                 parameter_bytes, random_gpt)


def test_floor_ingredients():
    assert copy_bandwidth("cpu", megabytes=16, reps=2) > 1e8  # any machine copies more than 100 MB/s
    assert matmul_peak("cpu", torch.float32, n=256, reps=2) > 1e8  # and multiplies faster than 0.1 GFLOP/s
    model = random_gpt("GPT-tiny", 16, "cpu", torch.bfloat16, vocab_size=64)
    tables = model.tok_embeddings.weight.numel() + model.cls_embedding.embedding_table.weight.numel()
    assert parameter_bytes(model) == 2 * (sum(p.numel() for p in model.parameters()) - tables)  # a row of each read
    layer = model.layers[0]
    per_layer = sum(m.weight.numel() for m in (layer.attention.wqkv, layer.attention.wo, layer.feed_forward.w1,
                                                layer.feed_forward.w2, layer.feed_forward.w3))
    assert matmul_parameters(model) == len(model.layers) * per_layer + model.output.weight.numel()
    assert depends_on_acceptance("sjd+coupling") and not depends_on_acceptance("zipar")


def test_table_ratios_follow_from_timed_steps_and_compression():
    report = bench_latency(["GPT-tiny"], [1], [16], ["sjd", "zipar"], {"sjd": 2.0}, device="cpu", dtype="fp32",
                           method_options={"sjd": {"window": 4}, "zipar": {"window": 2}}, reps=1, progress=False)
    rows = {r["method"]: r for r in report["results"]}
    assert list(rows) == ["ar", "sjd", "zipar"]  # AR is always the reference
    ar, sjd, zipar = rows["ar"], rows["sjd"], rows["zipar"]
    assert ar["speedup"] == pytest.approx(1.0) and ar["step_vs_ar"] == 1.0
    assert ar["steps_per_image"] == 16  # the prefill samples token 0, then 15 steps (passes counted alike for SJD)
    assert sjd["steps_per_image"] == 8  # 16 tokens / compression 2, not the random-weight run's count
    assert zipar["steps_per_image"] == zipar["timed_passes"] < ar["timed_passes"]  # a fixed schedule is its own count
    for r in rows.values():
        assert r["speedup"] == pytest.approx(ar["steps_per_image"] * ar["ms_per_step"]
                                             / (r["steps_per_image"] * r["ms_per_step"]))
        assert r["step_vs_floor"] == pytest.approx(r["ms_per_step"] / r["floor_ms"])
        assert r["floor_ms"] == max(r["read_floor_ms"], r["compute_floor_ms"])
    # rows per step, counted in each loop: AR one per sample, SJD the last token and a window of 4, ZipAR a token of
    # each active image row
    assert ar["rows_per_pass"] == 1 and sjd["rows_per_pass"] == 5 and zipar["rows_per_pass"] > 1
    assert sjd["compute_floor_ms"] == pytest.approx(5 * ar["compute_floor_ms"])
    with pytest.raises(ValueError, match=r"no step compression for \['sjd\+coupling'\]"):
        bench_latency(["GPT-tiny"], [1], [16], ["sjd+coupling"], {}, device="cpu", progress=False)


def test_cli_latency_table(tmp_path, capsys):
    speed = tmp_path / "speed.json"
    speed.write_text(json.dumps({"model": "m", "tokens": 16, "results": [{"method": "sjd", "step_compression": 1.6}]}))
    out = tmp_path / "latency.json"
    assert main(["bench", "speed", "--sizes", "GPT-tiny", "--tokens", "16", "--batch-sizes", "2", "--methods", "sjd",
                 "--window", "4", "--cfg", "2.0", "--reps", "1", "--compression-json", str(speed),
                 "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| GPT-tiny | " in table and "step / floor" in table and str(speed) in table
    report = json.loads(out.read_text())
    assert [r["method"] for r in report["results"]] == ["ar", "sjd"] and report["compression"] == {"sjd": 1.6}
    assert main(["bench", "speed", "--sizes", "GPT-Z"]) == 2
    assert "unknown GPT size(s) ['GPT-Z']" in capsys.readouterr().err
    assert main(["bench", "speed", "--sizes", "GPT-tiny", "--tokens", "15"]) == 2
    assert "square numbers" in capsys.readouterr().err
