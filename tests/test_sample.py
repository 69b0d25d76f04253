import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from vargen.cli import main
from vargen.pipeline import VarGenPipeline
from vargen.sample import missing_items, pack_npz, plan_samples, read_prompts, sample_to_folder


@pytest.fixture(scope="module")
def pipe():
    return VarGenPipeline.load("tiny-random")


def _files(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder)) if n.endswith(".png")}


class _Crash(RuntimeError):
    pass


class _CrashingPipe:
    """Forwards to the real pipeline and dies on the ``crash_on``-th call, as a killed job would."""

    def __init__(self, pipe, crash_on):
        self.pipe, self.crash_on, self.calls = pipe, crash_on, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.crash_on:
            raise _Crash("killed")
        return self.pipe(*args, **kwargs)

    def decode_tokens(self, tokens):
        return self.pipe.decode_tokens(tokens)


def test_killed_run_resumes_to_the_same_files(pipe, tmp_path):
    items = plan_samples(11, seed=3, num_classes=pipe.gpt.config.num_classes)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    sample_to_folder(pipe, items, str(whole), batch_size=4, progress=False, cfg_scale=2.0)
    with pytest.raises(_Crash):
        sample_to_folder(_CrashingPipe(pipe, crash_on=2), items, str(broken), batch_size=4, progress=False,
                         cfg_scale=2.0)
    assert len(_files(broken)) == 4  # the first batch landed, the second died before writing
    (broken / ".000005.png.tmp-123").write_bytes(b"half a png")  # debris of a kill mid-write
    counting = _CrashingPipe(pipe, crash_on=-1)
    done = sample_to_folder(counting, items, str(broken), batch_size=3, progress=False, cfg_scale=2.0)
    assert done["drawn"] == 7 and done["skipped"] == 4
    assert _files(broken) == _files(whole)  # same names, same bytes: no duplicates, no holes
    assert sample_to_folder(counting, items, str(broken), progress=False, cfg_scale=2.0)["drawn"] == 0


def test_processes_split_the_indices_and_agree_with_one_process(pipe, tmp_path):
    items = plan_samples(9, seed=0, num_classes=pipe.gpt.config.num_classes)
    assert [len(missing_items(items, str(tmp_path), r, 2)) for r in (0, 1)] == [5, 4]
    sample_to_folder(pipe, items, str(tmp_path / "one"), batch_size=9, progress=False)
    for rank in (0, 1):
        sample_to_folder(pipe, items, str(tmp_path / "two"), batch_size=2, process_index=rank, num_processes=2,
                         progress=False)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    logged = [json.loads(line)["indices"] for r in (0, 1) for line in open(tmp_path / "two" / f"stats-{r}.jsonl")]
    assert sorted(i for batch in logged for i in batch) == list(range(9))


def test_plans():
    balanced = plan_samples(25, seed=7, num_classes=10)
    assert [it.condition for it in balanced[:12]] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert [it.seed for it in balanced[:3]] == [7, 8, 9]
    rand = plan_samples(2000, seed=1, num_classes=10, classes="random")
    counts = np.bincount([it.condition for it in rand], minlength=10)
    assert counts.min() > 150 and len(set(it.condition for it in rand[:50])) > 5
    assert rand == plan_samples(2000, seed=1, num_classes=10, classes="random")
    assert [it.condition for it in plan_samples(5, prompts=["a", "b"])] == ["a", "b", "a", "b", "a"]
    with pytest.raises(ValueError, match="balanced"):
        plan_samples(3, num_classes=10, classes="uniform")


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n\ntwo stars\n")
    assert read_prompts(str(tmp_path / "p.txt")) == ["a red circle", "two stars"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "x"}\n{"caption": "y"}\n{"text": "z"}\n')
    with pytest.raises(ValueError, match="lines \\[2\\]"):
        read_prompts(str(tmp_path / "p.jsonl"))


def test_pack_npz_refuses_holes(pipe, tmp_path):
    items = plan_samples(4, num_classes=10)
    sample_to_folder(pipe, items[:3], str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="lacks 1 of 4"):
        pack_npz(str(tmp_path), 4)
    sample_to_folder(pipe, items, str(tmp_path), progress=False)
    arr = np.load(pack_npz(str(tmp_path), 4))["arr_0"]
    size = pipe.decode_tokens(torch.zeros(1, 64, dtype=torch.long)).shape[-1]
    assert arr.shape == (4, size, size, 3) and arr.dtype == np.uint8


def test_cli_sample_resumes_and_refuses_other_settings(tmp_path, capsys):
    out = str(tmp_path / "s")
    args = ["sample", "--model", "tiny-random", "-n", "5", "--out", out, "--batch-size", "2", "--quiet", "--npz"]
    assert main(args) == 0
    assert "drew 5 images, 0 already there" in capsys.readouterr().out
    os.remove(os.path.join(out, "000003.png"))
    assert main(args) == 0
    assert "drew 1 images, 4 already there" in capsys.readouterr().out
    assert np.load(os.path.join(out, "samples_5.npz"))["arr_0"].shape[0] == 5
    assert main(args + ["--cfg", "2"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_torchrun_two_processes_draw_the_same_set(tmp_path):
    """A real two-process run (gloo on CPU) writes the same files as one process with the same thread count."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["sample", "--model", "tiny-random", "-n", "6", "--batch-size", "2", "--quiet"]
    subprocess.run([sys.executable, "-m", "vargen.cli", *common, "--out", str(tmp_path / "one")], env=env, check=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "vargen.cli",
                    *common, "--out", str(tmp_path / "two")], env=env, check=True, capture_output=True)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    assert sorted(n for n in os.listdir(tmp_path / "two") if n.startswith("stats")) == ["stats-0.jsonl",
                                                                                        "stats-1.jsonl"]


def test_a_batch_without_its_cost_record_is_redrawn(pipe, tmp_path):
    """A kill between a batch's PNGs and its stats line: the rerun redraws it, so every image has a cost."""
    from vargen.eval.report import read_costs

    items = plan_samples(6, seed=1, num_classes=pipe.gpt.config.num_classes)
    sample_to_folder(pipe, items, str(tmp_path), batch_size=3, progress=False)
    whole = _files(tmp_path)
    stats = tmp_path / "stats-0.jsonl"
    first, second = stats.read_text().splitlines()
    stats.write_text(first + "\n" + second[:20])  # the second line cut mid-write
    (tmp_path / ".000004.png.tmp-999").write_bytes(b"half")  # and a temporary PNG of the kill
    assert [it.index for it in missing_items(items, str(tmp_path))] == [3, 4, 5]
    assert sample_to_folder(pipe, items, str(tmp_path), batch_size=3, progress=False)["drawn"] == 3
    assert _files(tmp_path) == whole and read_costs(str(tmp_path))["indices"] == list(range(6))
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_a_second_writer_is_refused(pipe, tmp_path):
    from vargen.errors import RunLockedError
    from vargen.sample import writer_lock

    items = plan_samples(2, num_classes=pipe.gpt.config.num_classes)
    with writer_lock(str(tmp_path)):
        with pytest.raises(RunLockedError, match="another process is sampling"):
            sample_to_folder(pipe, items, str(tmp_path), progress=False)
    assert sample_to_folder(pipe, items, str(tmp_path), progress=False)["drawn"] == 2  # released


def test_growing_n_resumes_and_thread_count_is_recorded(tmp_path, capsys, one_thread):
    out = str(tmp_path / "s")
    args = ["sample", "--model", "tiny-random", "--out", out, "--quiet", "--batch-size", "2"]
    assert main(args + ["-n", "3"]) == 0
    assert json.loads((tmp_path / "s" / "run.json").read_text())["threads"] == 1
    assert main(args + ["-n", "5"]) == 0
    assert "drew 2 images, 3 already there" in capsys.readouterr().out
    assert json.loads((tmp_path / "s" / "run.json").read_text())["n"] == 5
    torch.set_num_threads(2)
    with pytest.warns(UserWarning, match="drawn with 1 CPU threads and this run uses 2"):
        assert main(args + ["-n", "5"]) == 0
    torch.set_num_threads(1)
    assert main(args + ["-n", "5", "--seed", "9"]) == 2  # other settings are still refused
    assert "other settings" in capsys.readouterr().err


def test_the_default_model_named_either_way_resumes(tmp_path):
    from vargen.pipeline import default_model
    from vargen.sample import check_run_settings

    check_run_settings(str(tmp_path), {"model": "default", "n": 2})
    check_run_settings(str(tmp_path), {"model": default_model(), "n": 2})
    with pytest.raises(ValueError, match="other settings"):
        check_run_settings(str(tmp_path), {"model": "some/other-model", "n": 2})
