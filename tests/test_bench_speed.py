import json

import torch

from vargen.cli import main
from vargen.eval.speed import bench_speed, format_table
from vargen.pipeline import tiny_random_pipeline


def test_speed_report_compares_every_method_with_ar_on_the_same_seeds():
    pipe = tiny_random_pipeline()
    report = bench_speed(pipe, ["sjd", "sjd+coupling"], n=4, batch_size=2, sampling={"temperature": 0},
                         method_options={"sjd": {"window": 8}}, progress=False)
    rows = {r["method"]: r for r in report["results"]}
    assert list(rows) == ["ar", "sjd", "sjd+coupling"]  # ar is added as the reference
    assert rows["ar"]["forward_passes_mean"] == 64 and rows["ar"]["speedup"] == 1.0
    for name in ("sjd", "sjd+coupling"):  # greedy: every method yields AR's tokens
        assert rows[name]["token_tv_vs_ar"] == 0.0
        assert abs(rows[name]["log_likelihood_mean"] - rows["ar"]["log_likelihood_mean"]) < 1e-3
        assert rows[name]["step_compression"] == 64 / rows[name]["forward_passes_mean"]
    assert rows["sjd"]["options"] == {"window": 8} and len(rows["sjd"]["accepted_cells"]) == 64
    assert "| sjd |" in format_table(report) and "noise floor" in format_table(report)
    assert report["noise_floor"]["token_tv_ar_other_seeds"] == 0.0  # greedy AR does not depend on the seed


def test_methods_take_turns_on_each_batch_and_repeats_time_the_same_decodes(monkeypatch):
    """Ratios to AR come from decodes that ran side by side: every batch runs each method in turn, ``reps`` times,
    and the repeats change the timing only (same passes and tokens as one run)."""
    import vargen.eval.speed as speed

    calls, real = [], speed.get_method

    def spying(name, **kw):
        decode = real(name, **kw)
        return lambda *a, **k: calls.append((name, len(a[1]))) or decode(*a, **k)

    monkeypatch.setattr(speed, "get_method", spying)
    pipe = tiny_random_pipeline()
    twice = bench_speed(pipe, ["sjd"], n=4, batch_size=2, progress=False, reps=2)
    assert [c[0] for c in calls[:8]] == ["ar", "sjd"] * 4  # two batches x two repeats, in turn
    once = bench_speed(pipe, ["sjd"], n=4, batch_size=2, progress=False)
    assert twice["reps"] == 2 and once["reps"] == 1
    for a, b in zip(twice["results"], once["results"]):
        assert a["forward_passes_mean"] == b["forward_passes_mean"] and a["token_tv_vs_ar"] == b["token_tv_vs_ar"]


def test_bench_speed_cli_writes_json_and_plot(tmp_path, capsys):
    js, png = tmp_path / "speed.json", tmp_path / "speed.png"
    assert main(["bench", "speed", "--model", "tiny-random", "--methods", "sjd", "-n", "2", "--batch-size", "2",
                 "--cfg", "1", "--window", "4", "--json", str(js), "--plot", str(png)]) == 0
    report = json.loads(js.read_text())
    assert [r["method"] for r in report["results"]] == ["ar", "sjd"] and report["n"] == 2
    assert report["noise_floor"]["token_tv_ar_other_seeds"] > 0  # sampling: other seeds, other tokens
    assert png.stat().st_size > 0 and "step compr." in capsys.readouterr().out
    assert main(["bench", "speed", "--model", "tiny-random", "--methods", "ar,warp", "-n", "1"]) == 2
    assert "unknown decoding method 'warp'" in capsys.readouterr().err


def test_op_counter_sees_ops_and_host_syncs_per_pass(c2i):
    from vargen.decoding import SamplingConfig, decode_ar, decode_sjd
    from vargen.eval.opcount import count_ops

    cond, sampling = torch.arange(2), SamplingConfig()
    ar = count_ops(decode_ar, c2i, cond, sampling, [0, 1])
    sjd = count_ops(decode_sjd, c2i, cond, sampling, [0, 1])
    assert ar["syncs_per_pass"] < 0.5 <= 1 <= sjd["syncs_per_pass"]  # AR: none per token; SJD: one per verify step
    assert sjd["ops_per_pass"] > ar["ops_per_pass"] > 10


def test_ops_are_counted_eagerly_after_timing_so_a_compiled_pipeline_is_not_slowed():
    """Counting runs under a dispatch mode, which makes a compiled model recompile: the report counts with the
    eager model, after every method was timed, so a compiled pipeline's counts equal the eager one's and the
    compiled model never ran under the counter."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    eager = bench_speed(tiny_random_pipeline(), ["sjd"], n=2, batch_size=2, progress=False)
    torch._dynamo.reset()
    counters.clear()
    pipe = tiny_random_pipeline().enable_compile(backend="eager")
    compiled = bench_speed(pipe, ["sjd"], n=2, batch_size=2, progress=False)
    for a, b in zip(eager["results"], compiled["results"]):
        assert a["ops_per_pass"] == b["ops_per_pass"] and a["syncs_per_pass"] == b["syncs_per_pass"]
    assert counters["stats"]["unique_graphs"] == 2  # the AR step and the verify window, nothing under the counter
    torch._dynamo.reset()
