import json
import os

import numpy as np
import pytest
import torch

from vargen.cli import main
from vargen.eval.fid import feature_stats, folder_features, frechet_distance
from vargen.eval.report import FLOOR, bench_report, format_report, frechet_distance_eigh, read_costs
from vargen.pipeline import VarGenPipeline


class _PixelStats(torch.nn.Module):
    """A fixed extractor: per-channel means and spreads over a 4 x 4 grid of cells (96 features)."""

    name = "pixel-stats-test"
    image_size = 32

    def forward(self, images):
        cells = torch.nn.functional.avg_pool2d(images.float(), 8)
        sq = torch.nn.functional.avg_pool2d(images.float() ** 2, 8)
        return torch.cat([cells.flatten(1), (sq - cells ** 2).clamp_min(0).sqrt().flatten(1)], 1) / 255


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pipe = VarGenPipeline.load("tiny-random")
    out = tmp_path_factory.mktemp("report")
    # ZipAR with a lead of a whole row is plain AR in another pass order: same seeds, same images
    rep = bench_report(pipe, ["sjd", "zipar"], n=8, out_dir=str(out), seed=5, batch_size=4,
                       sampling={"cfg_scale": 2.0}, method_options={"sjd": {"window": 4}, "zipar": {"window": 8}},
                       extractor=_PixelStats(), bootstrap=20, progress=False)
    return pipe, out, rep


def test_report_rows_costs_and_distances(report):
    pipe, out, rep = report
    rows = {r["method"]: r for r in rep["results"]}
    assert list(rows) == ["ar", "sjd", "zipar", FLOOR]
    assert rows["ar"]["fd_vs_ar"] is None and rows["ar"]["speedup"] == pytest.approx(1.0)
    assert rows["zipar"]["fd_vs_ar"]["value"] == pytest.approx(0.0, abs=1e-6)  # identical images
    assert rows[FLOOR]["fd_vs_ar"]["value"] > 1e-3  # other seeds differ
    assert rows["sjd"]["step_compression"] > rows["ar"]["step_compression"]
    # the figures come from the folders: passes from the stats logs, FD from clean-fid features
    costs = read_costs(rows["sjd"]["folder"])
    assert costs["indices"] == list(range(8)) and rows["sjd"]["forward_passes_mean"] == costs["passes"].mean()
    assert len(costs["batch_latency_s"]) == 2 and costs["batch_latency_s"].mean() == pytest.approx(
        costs["latency_s"].mean())  # one timing per batch of 4: the unit the speedup interval resamples
    a = folder_features(rows[FLOOR]["folder"], _PixelStats())
    b = folder_features(rows["ar"]["folder"], _PixelStats())
    assert rows[FLOOR]["fd_vs_ar"]["value"] == pytest.approx(frechet_distance(*feature_stats(a), *feature_stats(b)))
    lo, hi = rows["sjd"]["forward_passes_ci95"]
    assert lo <= rows["sjd"]["forward_passes_mean"] <= hi
    table = format_report(rep)
    assert "| zipar |" in table and "not comparable with published FID" in table


def test_rerun_resumes_and_refuses_other_settings(report, tmp_path):
    pipe, out, rep = report
    os.remove(os.path.join(rep["results"][1]["folder"], "000007.png"))
    again = bench_report(pipe, ["sjd", "zipar"], n=8, out_dir=str(out), seed=5, batch_size=4,
                         sampling={"cfg_scale": 2.0}, method_options={"sjd": {"window": 4}, "zipar": {"window": 8}},
                         extractor=_PixelStats(), bootstrap=20, progress=False)
    assert [r["fd_vs_ar"] for r in again["results"]] == [r["fd_vs_ar"] for r in rep["results"]]
    # FD to a reference set: AR's own folder as the reference gives AR zero, the floor's other seeds not
    with_ref = bench_report(pipe, ["zipar"], n=8, out_dir=str(out), seed=5, batch_size=4, sampling={"cfg_scale": 2.0},
                            method_options={"zipar": {"window": 8}}, extractor=_PixelStats(), bootstrap=5,
                            reference=rep["results"][0]["folder"], progress=False)
    fd_ref = {r["method"]: r["fd_vs_reference"] for r in with_ref["results"]}
    assert fd_ref["ar"] == pytest.approx(0, abs=1e-6) and fd_ref[FLOOR] > 1e-3
    assert "FD-vargen vs reference" in format_report(with_ref)
    with pytest.raises(ValueError, match="other settings"):
        bench_report(pipe, ["sjd"], n=8, out_dir=str(out), seed=5, batch_size=4, sampling={"cfg_scale": 3.0},
                     extractor=_PixelStats(), bootstrap=10, progress=False)


def test_eigh_frechet_equals_clean_fid():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 24)) @ rng.normal(size=(24, 24))
    b = rng.normal(size=(200, 24)) @ rng.normal(size=(24, 24)) + 0.5
    for x, y in ((a, b), (a, a + 1e-3 * rng.normal(size=a.shape)), (b[:20], a[:20])):  # the last: rank-deficient
        assert frechet_distance_eigh(x, y) == pytest.approx(frechet_distance(*feature_stats(x), *feature_stats(y)),
                                                            rel=1e-5, abs=1e-6)


def test_cli_report_writes_table_json_and_plot(tmp_path, capsys, monkeypatch):
    import vargen.eval.classifier as classifier

    monkeypatch.setattr(classifier, "load_fd_vargen", lambda *a, **k: _PixelStats())
    out = tmp_path / "r"
    assert main(["bench", "report", "--model", "tiny-random", "--methods", "ar,sjd+coupling", "-n", "4",
                 "--batch-size", "2", "--window", "4", "--bootstrap", "20", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| sjd+coupling |" in printed and "speedup" in printed
    rep = json.loads((out / "report.json").read_text())
    assert [r["method"] for r in rep["results"]] == ["ar", "sjd+coupling", FLOOR]
    assert rep["extractor"] == "pixel-stats-test" and rep["comparable_with_published_fid"] is False
    assert (out / "report.png").stat().st_size > 0 and (out / "report.md").read_text().startswith("| method")
    assert np.isfinite(rep["results"][1]["fd_vs_ar"]["value"])
