"""`vargen bench train`: seconds per optimisation step of a recipe, fp32 against bf16 autocast (and compiled).

Each cell runs the real recipe (``vargen train WHAT``) for a few steps in a fresh process, since accelerate's
precision is fixed once per process, into a temporary folder, and reads the per-step clock from its
``log.jsonl``. The first step of a cell (allocations, compilation) is left out; the median of the rest is the
figure. Data preparation (tokenising, sampling a drafter's data, the end-of-run evaluation) is not a step and
is not timed: point ``"token_cache"`` at an existing cache to skip most of it.
"""
from __future__ import annotations

import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import List, Sequence

from ..errors import UsageError
from ..train.common import with_steps

PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
COMPILABLE = ("ar",)  # recipes whose config takes "compile"


def step_seconds(out_dir: str) -> List[float]:
    """Seconds of every logged step after each run's first (MuLo trains two parts: both count)."""
    times = []
    for log in sorted(glob.glob(os.path.join(out_dir, "**", "log.jsonl"), recursive=True)):
        with open(log) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        clock = [(r["step"], r["elapsed_s"]) for r in rows]
        times += [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(clock, clock[1:])]
    return times


def bench_train(what: str, config: dict, steps: int = 4, precisions: Sequence[str] = ("fp32", "bf16"),
                compile: bool = False, quiet: bool = True) -> dict:
    """``{"recipe", "steps", "rows": [{"precision", "compile", "s_per_step", "speedup"}]}``, speed-ups
    against the first cell (fp32 eager by default)."""
    if steps < 2:
        raise UsageError("--steps must be at least 2: the first step of a run is not timed")
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise UsageError(f"unknown precision {', '.join(unknown)}; choose from {', '.join(PRECISIONS)}")
    if compile and what not in COMPILABLE:
        raise UsageError(f"--compile: only the {', '.join(COMPILABLE)} recipe compiles its training pass")
    cells = [(p, c) for p in precisions for c in ((False, True) if compile else (False,))]
    rows = []
    for precision, compiled in cells:
        cfg = with_steps(config, steps, log_every=1, save_every=steps)
        cfg["mixed_precision"] = PRECISIONS[precision]
        cfg.pop("eval", None)  # an end-of-run evaluation is not a training step
        if compiled:
            cfg["compile"] = True
        elif what in COMPILABLE:
            cfg.pop("compile", None)
        with tempfile.TemporaryDirectory(prefix="vargen-bench-train-") as tmp:
            path = os.path.join(tmp, "config.json")
            with open(path, "w") as f:
                json.dump(cfg, f)
            run = subprocess.run([sys.executable, "-m", "vargen.cli", "train", what, "--config", path, "--out",
                                  os.path.join(tmp, "out")], capture_output=quiet, text=True)
            if run.returncode != 0:
                tail = (run.stderr or "").strip().splitlines()[-3:] if quiet else []
                raise RuntimeError(f"`vargen train {what}` failed in the {precision} cell: " + " / ".join(tail))
            times = step_seconds(os.path.join(tmp, "out"))
        rows.append({"precision": precision, "compile": compiled, "s_per_step": statistics.median(times),
                     "timed_steps": len(times)})
    for row in rows:
        row["speedup"] = rows[0]["s_per_step"] / row["s_per_step"]
    return {"recipe": what, "steps": steps, "threads": os.environ.get("OMP_NUM_THREADS"), "rows": rows}


def format_train_bench(report: dict) -> str:
    lines = [f"vargen train {report['recipe']}: median s / step over steps 2..{report['steps']} of each run",
             f"{'precision':<10}{'compile':<9}{'s/step':>8}{'speed-up':>10}"]
    for r in report["rows"]:
        lines.append(f"{r['precision']:<10}{'yes' if r['compile'] else 'no':<9}{r['s_per_step']:>8.3f}"
                     f"{r['speedup']:>9.2f}x")
    return "\n".join(lines)
