import json

import pytest

from vargen.cli import main
from vargen.errors import UsageError
from vargen.eval.train_speed import bench_train, step_seconds
from vargen.train.common import with_steps
from vargen.train.tokenizer import train_tokenizer

VQ_MODEL = {"codebook_size": 64, "ch": 32, "ch_mult": [1, 2], "z_channels": 32, "num_res_blocks": 1}
SCENES = [{"name": "scenes", "resolution": 16, "seed": 0, "length": 64}]


def test_step_seconds_reads_each_runs_clock_without_its_first_step(tmp_path):
    for part, clock in (("drafter", [(1, 5.0), (2, 6.0), (4, 10.0)]), ("upsampler", [(1, 1.0), (2, 1.5)])):
        (tmp_path / part).mkdir()
        (tmp_path / part / "log.jsonl").write_text(
            "".join(json.dumps({"step": s, "elapsed_s": t, "loss": 0.0}) + "\n" for s, t in clock))
    assert sorted(step_seconds(str(tmp_path))) == [0.5, 1.0, 2.0]


def test_with_steps_reaches_every_trained_part():
    config = {"steps": 100, "log_every": 50, "drafter_train": {"steps": 800, "lr": 1e-3},
              "upsampler_train": {"steps": 700, "log_every": 20}}
    out = with_steps(config, 3, log_every=1)
    assert (out["steps"], out["log_every"]) == (3, 1)
    assert out["drafter_train"] == {"steps": 3, "lr": 1e-3}  # log_every comes from the top level
    assert out["upsampler_train"] == {"steps": 3, "log_every": 1}
    assert config["drafter_train"]["steps"] == 800  # the caller's config is left alone


def test_bench_train_times_a_real_recipe_per_precision(tmp_path, capsys):
    train_tokenizer({"model": VQ_MODEL, "data": SCENES, "steps": 1, "batch_size": 4, "lr": 1e-3}, str(tmp_path / "vq"))
    config = {"tokenizer": str(tmp_path / "vq" / "vq"), "data": SCENES, "num_images": 8,
              "model": {"size": "GPT-tiny", "model_type": "t2i"},
              "text_encoder": {"caption_dim": 32, "width": 32, "layers": 1, "heads": 2, "max_length": 12},
              "batch_size": 4, "lr": 1e-3, "steps": 1000}
    (tmp_path / "ar.json").write_text(json.dumps(config))
    assert main(["bench", "train", "ar", "--config", str(tmp_path / "ar.json"), "--steps", "3",
                 "--json", str(tmp_path / "t.json")]) == 0
    report = json.loads((tmp_path / "t.json").read_text())
    assert [(r["precision"], r["timed_steps"]) for r in report["rows"]] == [("fp32", 2), ("bf16", 2)]
    assert report["rows"][0]["speedup"] == 1.0 and all(r["s_per_step"] > 0 for r in report["rows"])
    assert "bf16" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="failed in the fp32 cell"):
        bench_train("ar", {**config, "tokenizer": str(tmp_path / "missing")}, steps=2, precisions=["fp32"])


@pytest.mark.parametrize("kwargs, message", [({"steps": 1}, "at least 2"), ({"precisions": ["fp8"]}, "unknown precision fp8"),
                                             ({"compile": True}, "only the ar recipe")])
def test_bench_train_refuses_what_it_cannot_time(kwargs, message):
    with pytest.raises(UsageError, match=message):
        bench_train("tokenizer", {}, **kwargs)
