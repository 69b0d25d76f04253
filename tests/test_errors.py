"""Every user-facing failure of the CLI: exit 2, one message naming the problem, no traceback, nothing
half-written. "Read-only" outputs are paths under a regular file (``blocker/out.png``): tests run as root,
which ignores permission bits, and no path can be created under a file for any user."""
import json
import os
import subprocess
import sys

import pytest
import torch

from vargen.cli import main
from vargen.pipeline import tiny_random_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A good tiny model folder and three damaged copies."""
    base = tmp_path_factory.mktemp("models")
    good = base / "good"
    tiny_random_pipeline().save_pretrained(good)
    weights = "gpt/diffusion_pytorch_model.safetensors"
    made = {"good": good}
    for name in ("truncated", "mismatched", "badjson"):
        folder = base / name
        subprocess.run(["cp", "-r", str(good), str(folder)], check=True)
        made[name] = folder
    with open(made["truncated"] / weights, "r+b") as f:
        f.truncate(5000)
    config = json.loads((good / "gpt/config.json").read_text())
    config["n_layer"] += 3
    (made["mismatched"] / "gpt/config.json").write_text(json.dumps(config))
    (made["badjson"] / "gpt/config.json").write_text('{"n_layer": ')
    return made


def _cases(models, tmp):
    blocker = tmp / "blocker"  # a regular file: nothing can be written "inside" it
    blocker.write_text("x")
    (tmp / "adir").mkdir()
    (tmp / "bad.json").write_text("{not json")
    (tmp / "init_missing.json").write_text(json.dumps({"init": str(tmp / "no-run" / "vq"), "steps": 1}))
    (tmp / "export.json").write_text(json.dumps({"name": "x", "vq_run": str(tmp / "no-run"), "ar_run": str(tmp / "no-ar"),
                                                 "out": str(tmp / "exported"), "prompts": ["a"], "eval_data": {}}))
    gen = ["generate", "1", "--model", "tiny-random", "--quiet", "-o", str(tmp / "ok.png")]
    t = str(tmp)
    return {
        "truncated safetensors": (["generate", "1", "--model", str(models["truncated"]), "-o", f"{t}/a.png"],
                                  "cannot load the model"),
        "config does not match weights": (["generate", "1", "--model", str(models["mismatched"]), "-o", f"{t}/a.png"],
                                          "config.json does not match"),
        "invalid JSON config": (["generate", "1", "--model", str(models["badjson"]), "-o", f"{t}/a.png"],
                                "not a valid JSON"),
        "output under a file": (gen[:-1] + [f"{t}/blocker/out.png"], "cannot write into"),
        "output is a folder": (gen[:-1] + [f"{t}/adir"], "is a folder"),
        "unknown image extension": (gen[:-1] + [f"{t}/out.gif"], "extension '.gif'"),
        "stats unwritable": (gen + ["--stats", f"{t}/blocker/stats.json"], "cannot write into"),
        "cuda without a GPU": (gen + ["--device", "cuda"], "no CUDA GPU"),
        "unknown device": (gen + ["--device", "foo"], "unknown device 'foo'"),
        "cfg inf": (gen + ["--cfg", "inf"], "cfg_scale must be >= 0 and finite"),
        "temperature inf": (gen + ["--temperature", "inf"], "temperature must be >= 0 and finite"),
        "temperature nan": (gen + ["--temperature", "nan"], "temperature must be >= 0 and finite"),
        "jacobi with temperature": (gen + ["--method", "jacobi", "--temperature", "0.5"],
                                    "jacobi is greedy and would ignore --temperature"),
        "option checked before the model loads": (["generate", "1", "--model", f"{t}/no-model", "--window", "4",
                                                   "-o", f"{t}/a.png"], "--window is not taken by ar"),
        "sample into a read-only folder": (["sample", "--model", "tiny-random", "-n", "2", "--out",
                                            f"{t}/blocker/samples"], "cannot write into"),
        "eval scenes into a read-only folder": (["eval", "scenes", "--model", "tiny-random", "--out",
                                                 f"{t}/blocker/scenes"], "cannot write into"),
        "negative --colour-seeds": (["eval", "scenes", "--model", f"{t}/no-model", "--colour-seeds", "-1", "--out",
                                     f"{t}/scenes"], "--colour-seeds takes a count of seeds >= 0"),
        "train from a missing earlier run": (["train", "tokenizer", "--config", f"{t}/init_missing.json", "--out",
                                              f"{t}/run"], "not found at"),
        "train with an invalid JSON config": (["train", "tokenizer", "--config", f"{t}/bad.json", "--out", f"{t}/run"],
                                              "is not valid JSON"),
        "export a missing run": (["export", f"{t}/export.json"], "the tokenizer run's vq/ folder not found"),
        "bad --max-memory": (gen + ["--max-memory", "lots"], "--max-memory takes a size"),
        "-n beyond any chunking": (gen + ["-n", "100000", "--max-memory", "1G"],
                                   "100000 image(s) of 64x64 needs about 2.3 GB, over the memory budget of 1.0 GB"),
        "--scale 1000": (["generate", "a red circle", "--model", "scenes-t2i", "--scale", "1000", "-o", f"{t}/a.png",
                          "--max-memory", "1G"], "1 image(s) of 128000x128000 needs about"),
        "--size 100000x100000": (["generate", "a red circle", "--model", "scenes-t2i", "--size", "100000x100000",
                                  "-o", f"{t}/a.png", "--max-memory", "1G"], "1 image(s) of 100000x100000 needs"),
    }


CASES = ["truncated safetensors", "config does not match weights", "invalid JSON config", "output under a file",
         "output is a folder", "unknown image extension", "stats unwritable", "cuda without a GPU", "unknown device",
         "cfg inf", "temperature inf", "temperature nan", "jacobi with temperature",
         "option checked before the model loads", "sample into a read-only folder",
         "eval scenes into a read-only folder", "negative --colour-seeds", "train from a missing earlier run",
         "train with an invalid JSON config", "export a missing run", "bad --max-memory", "-n beyond any chunking",
         "--scale 1000", "--size 100000x100000"]


@pytest.mark.parametrize("case", CASES)
def test_user_errors_exit_2_with_a_message_and_leave_nothing(case, models, tmp_path, capsys, one_thread):
    if case == "cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    argv, message = _cases(models, tmp_path)[case]
    before = set(_tree(tmp_path))
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # above it, at most the progress bars of model loading
    assert message in last and last.startswith("vargen: error: ") and "Traceback" not in err
    assert len(last) < 2100
    left = set(_tree(tmp_path)) - before
    assert not [p for p in left if ".tmp-" in p or ".vargen-probe" in p], left
    assert not [p for p in left if p.endswith((".png", ".json"))], left  # nothing written on failure


def _tree(root):
    return [os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs]


def test_stats_path_is_checked_before_any_work(tmp_path, capsys):
    (tmp_path / "blocker").write_text("x")
    assert main(["generate", "1", "--model", "tiny-random", "--quiet", "-o", str(tmp_path / "img.png"),
                 "--stats", str(tmp_path / "blocker" / "s.json")]) == 2
    assert not (tmp_path / "img.png").exists()  # refused before the image was drawn, not after


def test_outputs_into_folders_that_do_not_exist_yet(tmp_path, one_thread):
    """A fresh clone has no outputs/: `make demo` writes outputs/demo.png and its --stats beside it."""
    out, stats = tmp_path / "outputs" / "demo.png", tmp_path / "outputs" / "more" / "stats.json"
    assert main(["generate", "1", "--model", "tiny-random", "--quiet", "-o", str(out), "--stats", str(stats)]) == 0
    assert out.is_file() and json.loads(stats.read_text())
    assert sorted(os.listdir(out.parent)) == ["demo.png", "more"]  # no temporary file left


@pytest.mark.parametrize("ext,fmt", [(".png", "PNG"), (".jpg", "JPEG"), (".jpeg", "JPEG"), (".webp", "WEBP")])
def test_output_extension_picks_the_format(ext, fmt, tmp_path, one_thread):
    from PIL import Image

    out = tmp_path / f"img{ext}"
    assert main(["generate", "1", "--model", "tiny-random", "--quiet", "-o", str(out)]) == 0
    assert Image.open(out).format == fmt
    assert os.listdir(tmp_path) == [out.name]


def test_debug_shows_the_traceback_and_plain_does_not(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    argv = [sys.executable, "-m", "vargen.cli", "generate", "1", "--model", "tiny-random", "--cfg", "inf",
            "-o", str(tmp_path / "x.png")]
    plain = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
    debug = subprocess.run(argv + ["--debug"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert plain.returncode == debug.returncode == 2
    assert "Traceback" not in plain.stderr and "cfg_scale must be" in plain.stderr
    assert "Traceback" in debug.stderr and "UsageError" in debug.stderr


# ----------------------------------------------------------------------------- prompts
def _t2i(tmp_path):
    from conftest import make_t2i_pipeline

    folder = tmp_path / "t2i"
    make_t2i_pipeline(["a red circle", "a blue star", "cafe creme"]).save_pretrained(folder)
    return str(folder)


def test_prompts_are_normalised_and_what_is_dropped_is_reported():
    from vargen.models.text import dropped_characters, split_words

    assert split_words("Ｃａｆé Crème") == ["cafe", "creme"]  # NFKC full-width, accents folded
    assert dropped_characters("a red 🍎 circle 猫!") == ["猫", "🍎"]  # punctuation is a separator, not content
    from conftest import make_t2i_pipeline

    pipe = make_t2i_pipeline(["a red circle", "cafe creme"])
    with pytest.warns(UserWarning, match="dropped.*🍎"):
        pipe("a red 🍎 circle", progress=False, output_type="latent")
    with _no_warning():  # accents fold into known words: nothing to report
        pipe("Café Crème", progress=False, output_type="latent")


class _no_warning:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


@pytest.mark.parametrize("prompt,message", [
    ("", "has no words this text encoder reads"),
    ("🍎 猫", "has no words this text encoder reads"),
    ("purple hexagon", "none of the words of 'purple hexagon' is known"),
])
def test_prompts_that_condition_on_nothing_are_errors(prompt, message, tmp_path, capsys, one_thread):
    assert main(["generate", prompt, "--model", _t2i(tmp_path), "--quiet", "-o", str(tmp_path / "x.png")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_unconditional_must_be_asked_for(tmp_path, capsys, one_thread):
    model, out = _t2i(tmp_path), str(tmp_path / "x.png")
    assert main(["generate", "--model", model, "--quiet", "-o", out]) == 2
    assert "--unconditional" in capsys.readouterr().err
    assert main(["generate", "a red circle", "--unconditional", "--model", model, "--quiet", "-o", out]) == 2
    assert main(["generate", "--unconditional", "--model", model, "--quiet", "-o", out, "--cfg", "1"]) == 0


def test_a_huge_prompt_is_not_echoed(tmp_path, capsys, one_thread):
    prompt = " ".join(["red"] * 10_000)
    assert main(["generate", prompt, "--model", _t2i(tmp_path), "--quiet", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "prompt too long: 10000 words" in err and len(err.strip().splitlines()[-1]) < 400


def test_one_spelling_per_option(tmp_path, capsys, one_thread):
    from vargen.cli import build_parser

    parser = build_parser()
    for argv in (["generate", "1", "--method", "zipar-adaptive"], ["bench", "speed"]):
        new = parser.parse_args(argv + ["--zipar-min-window", "3"])
        assert new.zipar_min_window == 3
    assert "warning" not in capsys.readouterr().err
    old = parser.parse_args(["generate", "1", "--method", "zipar-adaptive", "--min-window", "2"])
    assert old.zipar_min_window == 2 and "--min-window is an old spelling of --zipar-min-window" in capsys.readouterr().err
