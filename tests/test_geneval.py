import json
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import make_t2i_pipeline
from vargen.eval.geneval import (GenEvalUnavailable, check_layout, format_summary, read_metadata, sample_seed,
                                 score_geneval, summary_scores, write_geneval)

METADATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "geneval" / "evaluation_metadata.jsonl"
needs_metadata = pytest.mark.skipif(not METADATA.is_file(), reason=f"GenEval metadata not at {METADATA}")


class FakePipe:
    """Deterministic stand-in for a t2i pipeline: the image depends only on (prompt, seed)."""

    name_or_path = "fake"

    def __init__(self, size=8):
        self.size, self.calls = size, []

    def __call__(self, prompts, seed, output_type, progress, **sampling):
        assert output_type == "np" and progress is False and len(seed) == len(prompts)
        self.calls.append((list(prompts), list(seed), sampling))
        images = []
        for p, s in zip(prompts, seed):
            rng = np.random.default_rng([s, sum(map(ord, p))])
            images.append(rng.random((self.size, self.size, 3), dtype=np.float32))
        return SimpleNamespace(images=np.stack(images))


def _official_listing(imagedir):
    """What GenEval's evaluate_images.py main() reads: [(metadata, image path)]."""
    out = []
    for subfolder in os.listdir(imagedir):
        folderpath = os.path.join(imagedir, subfolder)
        if not os.path.isdir(folderpath) or not subfolder.isdigit():
            continue
        with open(os.path.join(folderpath, "metadata.jsonl")) as fp:
            metadata = json.load(fp)
        for imagename in os.listdir(os.path.join(folderpath, "samples")):
            imagepath = os.path.join(folderpath, "samples", imagename)
            if not os.path.isfile(imagepath) or not re.match(r"\d+\.png", imagename):
                continue
            out.append((metadata, imagepath))
    return sorted(out, key=lambda t: t[1])


@needs_metadata
def test_read_metadata_real_file():
    meta = read_metadata(str(METADATA))
    assert len(meta) == 553
    assert meta[0] == {"tag": "single_object", "include": [{"class": "bench", "count": 1}],
                       "prompt": "a photo of a bench"}
    counts = {t: sum(m["tag"] == t for m in meta) for t in {m["tag"] for m in meta}}
    assert counts == {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100,
                      "color_attr": 100}
    assert all("exclude" in m for m in meta if m["tag"] == "counting")


def test_read_metadata_errors(tmp_path):
    missing = tmp_path / "nope.jsonl"
    source = r"evaluation_metadata\.jsonl of https://github\.com/djghosh13/geneval"
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl.*" + source):
        read_metadata(str(missing))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tag": "single_object", "include": [], "prompt": "a"}\n{"tag": "colors", "include": []}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2 lacks 'prompt'"):
        read_metadata(str(bad))
    bad.write_text('{"tag": "single_object", "include": [], "prompt": "a"}\n\n{"tag": "x"}\n')
    with pytest.raises(ValueError, match="line 2 is empty"):
        read_metadata(str(bad))
    bad.write_text('{"tag": "single_object", "prompt": "a"\n')
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        read_metadata(str(bad))
    bad.write_text('{"prompt": "a", "tag": "colors"}\n')
    with pytest.raises(ValueError, match="lacks 'include'"):
        read_metadata(str(bad))
    good = tmp_path / "good.jsonl"
    good.write_text('{"tag": "colors", "include": [], "prompt": "a"}\n\n\n')
    assert read_metadata(str(good)) == [{"tag": "colors", "include": [], "prompt": "a"}]


@needs_metadata
def test_write_layout_resume_and_redraw(tmp_path):
    out = str(tmp_path / "geneval")
    pipe = FakePipe()
    done = write_geneval(pipe, str(METADATA), out, n_samples=2, seed=10, batch_size=4, limit=3, progress=False,
                         cfg_scale=3.0)
    assert done["prompts"] == 3 and done["images"] == 6 and done["drawn"] == 6 and done["skipped"] == 0
    # batched across prompts, one seed per image (seed + i * n_samples + n), sampling passed on
    assert [len(c[0]) for c in pipe.calls] == [4, 2]
    assert pipe.calls[0][0] == ["a photo of a bench"] * 2 + ["a photo of a cow"] * 2
    assert pipe.calls[0][1] == [10, 11, 12, 13] and pipe.calls[1][1] == [14, 15]
    assert pipe.calls[0][2] == {"cfg_scale": 3.0} and sample_seed(10, 2, 1, 2) == 15
    source = METADATA.read_text().split("\n")
    for i in range(3):
        folder = Path(out) / f"{i:05d}"
        assert (folder / "metadata.jsonl").read_text() == source[i]  # the very line, as json.dump writes it
        assert sorted(os.listdir(folder / "samples")) == ["0000.png", "0001.png"]
    assert check_layout(out, str(METADATA), n_samples=2, limit=3) == (3, 6)
    assert check_layout(out) == (3, 6)
    listing = _official_listing(out)
    assert len(listing) == 6 and listing[0][0]["prompt"] == "a photo of a bench"
    assert not [f for _, _, files in os.walk(out) for f in files if ".tmp" in f]
    # the PNG holds the pipeline's image, rounded to uint8
    from PIL import Image

    first = np.asarray(Image.open(Path(out) / "00000" / "samples" / "0001.png"))
    expected = FakePipe()(["a photo of a bench"], seed=[11], output_type="np", progress=False).images[0]
    assert np.array_equal(first, (expected * 255).round().astype(np.uint8))

    # a rerun draws nothing
    pipe.calls.clear()
    again = write_geneval(pipe, str(METADATA), out, n_samples=2, seed=10, batch_size=4, limit=3, progress=False,
                          cfg_scale=3.0)
    assert again["drawn"] == 0 and again["skipped"] == 6 and pipe.calls == []
    # a missing sample is redrawn, identically
    lost = Path(out) / "00001" / "samples" / "0001.png"
    before = lost.read_bytes()
    lost.unlink()
    again = write_geneval(pipe, str(METADATA), out, n_samples=2, seed=10, batch_size=4, limit=3, progress=False,
                          cfg_scale=3.0)
    assert again["drawn"] == 1 and pipe.calls[0][:2] == (["a photo of a cow"], [13])
    assert lost.read_bytes() == before
    # more prompts later: only the new ones are drawn, with the same seeds as in one go
    pipe.calls.clear()
    more = write_geneval(pipe, read_metadata(str(METADATA)), out, n_samples=2, seed=10, batch_size=16, limit=5,
                         progress=False, cfg_scale=3.0)
    assert more["drawn"] == 4 and pipe.calls[0][1] == [16, 17, 18, 19]
    assert check_layout(out, str(METADATA), n_samples=2, limit=5) == (5, 10)
    # other settings in the same folder are refused
    with pytest.raises(ValueError, match="other settings.*n_samples"):
        write_geneval(pipe, str(METADATA), out, n_samples=4, seed=10, limit=5, progress=False, cfg_scale=3.0)
    with pytest.raises(ValueError, match="other settings.*cfg_scale"):
        write_geneval(pipe, str(METADATA), out, n_samples=2, seed=10, limit=5, progress=False, cfg_scale=4.0)


def test_grid_and_default_four_samples(tmp_path):
    meta = [{"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}],
             "prompt": "a photo of a red car"}]
    out = str(tmp_path / "g")
    done = write_geneval(FakePipe(size=6), meta, out, progress=False, grid=True)
    assert done["images"] == 4 and check_layout(out, meta, n_samples=4) == (1, 4)
    from PIL import Image

    assert Image.open(Path(out) / "00000" / "grid.png").size == (4 * 8 + 2, 10)
    # a folder written for another metadata line is not overwritten
    other = [dict(meta[0], prompt="a photo of a blue car")]
    with pytest.raises(ValueError, match="00000.metadata.jsonl holds another prompt's metadata"):
        write_geneval(FakePipe(size=6), other, out, progress=False)


def _tiny_t2i(meta):
    return make_t2i_pipeline([m["prompt"] for m in meta])


@needs_metadata
def test_tiny_t2i_pipeline_writes_and_redraws_identically(tmp_path, one_thread):
    meta = read_metadata(str(METADATA))[:3]
    pipe = _tiny_t2i(meta)
    out = str(tmp_path / "t2i")
    done = write_geneval(pipe, meta, out, n_samples=2, seed=0, batch_size=8, progress=False, cfg_scale=2.0)
    assert done["drawn"] == 6 and check_layout(out, meta, n_samples=2) == (3, 6)
    lost = Path(out) / "00002" / "samples" / "0000.png"
    before = lost.read_bytes()
    lost.unlink()
    assert write_geneval(pipe, meta, out, n_samples=2, seed=0, batch_size=8, progress=False,
                         cfg_scale=2.0)["drawn"] == 1
    assert lost.read_bytes() == before


@needs_metadata
def test_cli_writes_the_layout_and_says_what_scoring_lacks(tmp_path, one_thread, capsys):
    from vargen.cli import main

    pipe = _tiny_t2i(read_metadata(str(METADATA))[:2])
    pipe.save_pretrained(str(tmp_path / "model"))
    out = str(tmp_path / "geneval")
    args = ["eval", "geneval", "--metadata", str(METADATA), "--model", str(tmp_path / "model"), "--out", out,
            "--limit", "2", "--n-samples", "2", "--quiet", "--cfg", "2"]
    assert main(args + ["--score"]) == 2
    captured = capsys.readouterr()
    assert "drew 4 images" in captured.out and "2 prompts, 4 images in GenEval's layout" in captured.out
    assert "evaluate_images.py" in captured.err
    assert check_layout(out, read_metadata(str(METADATA))[:2], n_samples=2) == (2, 4)
    assert main(args[:2] + ["--metadata", str(tmp_path / "nope.jsonl"), "--out", out]) == 2
    assert "nope.jsonl" in capsys.readouterr().err


def _good_layout(root, n_prompts=2, n_samples=2):
    meta = [{"tag": "single_object", "include": [{"class": c, "count": 1}], "prompt": f"a photo of a {c}"}
            for c in ("bench", "cow", "bicycle")[:n_prompts]]
    write_geneval(FakePipe(size=4), meta, str(root), n_samples=n_samples, progress=False)
    return meta


def test_check_layout_names_the_first_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        check_layout(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no prompt folders"):
        check_layout(str(tmp_path / "empty"))

    def fresh(name):
        root = tmp_path / name
        meta = _good_layout(root)
        assert check_layout(str(root), meta, n_samples=2) == (2, 4)
        return root, meta

    root, meta = fresh("no_meta")
    (root / "00001" / "metadata.jsonl").unlink()
    with pytest.raises(ValueError, match=re.escape(str(root / "00001" / "metadata.jsonl")) + " is missing"):
        check_layout(str(root))

    root, meta = fresh("bad_name")
    shutil.copy(root / "00000" / "samples" / "0000.png", root / "00000" / "samples" / "sample_a.png")
    with pytest.raises(ValueError, match=r"sample_a\.png: not an image the evaluator reads"):
        check_layout(str(root))

    root, meta = fresh("tmp_name")  # re.match(r"\d+\.png") would read this one: refused
    shutil.copy(root / "00000" / "samples" / "0000.png", root / "00000" / "samples" / "0002.png.tmp")
    with pytest.raises(ValueError, match=r"0002\.png\.tmp"):
        check_layout(str(root))

    root, meta = fresh("hidden_tmp")  # an interrupted write's hidden temporary: harmless
    (root / "00000" / "samples" / ".0002.png.tmp-123").write_bytes(b"partial")
    assert check_layout(str(root), meta, n_samples=2) == (2, 4)

    root, meta = fresh("not_png")
    (root / "00001" / "samples" / "0001.png").write_bytes(b"JFIF....")
    with pytest.raises(ValueError, match=r"0001\.png is not a PNG"):
        check_layout(str(root))

    root, meta = fresh("multi_json")
    (root / "00000" / "metadata.jsonl").write_text(json.dumps(meta[0]) + "\n" + json.dumps(meta[1]) + "\n")
    with pytest.raises(ValueError, match="not one JSON object"):
        check_layout(str(root))

    root, meta = fresh("wrong_meta")
    with pytest.raises(ValueError, match="differs from metadata line 0"):
        check_layout(str(root), meta[::-1])

    root, meta = fresh("missing_prompt")
    shutil.rmtree(root / "00001")
    assert check_layout(str(root)) == (1, 2)
    with pytest.raises(ValueError, match="lacks prompt folders 00001"):
        check_layout(str(root), meta)
    assert check_layout(str(root), meta, limit=1) == (1, 2)

    root, meta = fresh("no_samples")
    for f in (root / "00001" / "samples").iterdir():
        f.unlink()
    with pytest.raises(ValueError, match="holds no images"):
        check_layout(str(root))
    shutil.rmtree(root / "00001" / "samples")
    with pytest.raises(ValueError, match=r"samples is missing"):
        check_layout(str(root))

    root, meta = fresh("count")
    (root / "00000" / "samples" / "0001.png").unlink()
    assert check_layout(str(root)) == (2, 3)
    with pytest.raises(ValueError, match=r"holds samples \[0\], expected 0 \.\. 1"):
        check_layout(str(root), n_samples=2)

    root, meta = fresh("dup")
    shutil.copytree(root / "00001", root / "1")
    with pytest.raises(ValueError, match="both prompt 1"):
        check_layout(str(root))

    root, meta = fresh("ignored")  # what the evaluator ignores is ignored here too
    (root / "results.jsonl").write_text("")
    (root / "notes").mkdir()
    assert check_layout(str(root), meta, n_samples=2) == (2, 4)


def test_score_geneval_without_weights_fails_clearly(tmp_path):
    root = tmp_path / "images"
    _good_layout(root)
    with pytest.raises(GenEvalUnavailable) as err:
        score_geneval(str(root))
    msg = str(err.value)
    for needle in ("mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth", "download_models.sh", "ViT-L-14",
                   "djghosh13/geneval", "mmdet", "open_clip",
                   f"python evaluation/evaluate_images.py {root} --outfile {root}/results.jsonl --model-path",
                   f"python evaluation/summary_scores.py {root}/results.jsonl"):
        assert needle in msg, needle
    # with the files there, what is still missing is named, and the files are not
    det = tmp_path / "det"
    det.mkdir()
    (det / "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth").write_bytes(b"")
    clip = tmp_path / "ViT-L-14.pt"
    clip.write_bytes(b"")
    repo = tmp_path / "geneval"
    (repo / "evaluation").mkdir(parents=True)
    (repo / "evaluation" / "evaluate_images.py").write_text("")
    (repo / "evaluation" / "object_names.txt").write_text("")
    import importlib.util

    if importlib.util.find_spec("mmdet") is None:
        with pytest.raises(GenEvalUnavailable) as err:
            score_geneval(str(root), str(det), str(clip), str(repo))
        assert "mmdet" in str(err.value) and "checkpoint" not in str(err.value)
    with pytest.raises(GenEvalUnavailable, match=r"checkpoint .*elsewhere"):
        score_geneval(str(root), str(tmp_path / "elsewhere"), str(clip), str(repo))
    with pytest.raises(GenEvalUnavailable) as err:
        score_geneval(str(root), str(det), "openai", str(repo))  # open_clip may fetch the weights itself
    assert "ViT-L-14" not in str(err.value)
    (root / "00000" / "metadata.jsonl").unlink()
    with pytest.raises(ValueError, match="metadata.jsonl is missing"):  # the layout is checked first
        score_geneval(str(root), str(det), str(clip), str(repo))


def test_summary_scores_math(tmp_path):
    rows = []

    def add(tag, prompt, flags):
        meta = json.dumps({"tag": tag, "prompt": prompt})
        for k, ok in enumerate(flags):
            rows.append({"filename": f"{prompt}/{k}.png", "tag": tag, "prompt": prompt, "correct": ok,
                         "reason": "", "metadata": meta, "details": "{}"})

    add("single_object", "a bench", [True, True, True, True])
    add("single_object", "a cow", [True, False, True, True])  # 7 / 8
    add("counting", "two clocks", [False, False, False, True])  # 1 / 4
    add("position", "a dog right of a cat", [False] * 4)  # 0 / 4
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = summary_scores(str(path))
    assert s["images"] == 16 and s["prompts"] == 4
    assert s["correct_images"] == pytest.approx(8 / 16) and s["correct_prompts"] == pytest.approx(3 / 4)
    assert list(s["tasks"]) == ["single_object", "counting", "position"]  # order of appearance
    assert s["tasks"]["single_object"] == {"accuracy": 7 / 8, "correct": 7, "n": 8}
    assert s["overall"] == pytest.approx((7 / 8 + 1 / 4 + 0) / 3)  # unweighted over tasks, not images
    assert summary_scores(rows) == s
    text = format_summary(s)
    assert "Total images: 16" in text and "% correct prompts: 75.00%" in text
    assert "single_object    = 87.50% (7 / 8)" in text
    assert text.endswith(f"Overall score (avg. over tasks): {(7 / 8 + 1 / 4) / 3:.5f}")
    with pytest.raises(ValueError, match="lacks correct"):
        summary_scores([{"tag": "colors"}])
    with pytest.raises(FileNotFoundError):
        summary_scores(str(tmp_path / "none.jsonl"))


FAKE_OPEN_CLIP = """
import json, os
def create_model_and_transforms(arch, pretrained=None, **kw):
    with open(os.environ["FAKE_CLIP_LOG"], "w") as f:
        json.dump({"arch": arch, "pretrained": pretrained, **kw}, f)
    return None, None, None
"""

FAKE_EVALUATOR = """
import argparse, json, os, re
import open_clip
parser = argparse.ArgumentParser()
parser.add_argument("imagedir")
parser.add_argument("--outfile", default="results.jsonl")
parser.add_argument("--model-path", default="./")
parser.add_argument("--options", nargs="*", default=[])
args = parser.parse_args()
open_clip.create_model_and_transforms("ViT-L-14", pretrained="openai", device="cuda")
assert os.path.isfile(os.path.join(os.path.dirname(__file__), "object_names.txt"))
assert os.path.isfile(os.path.join(args.model_path, "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth"))
rows = []
for sub in sorted(os.listdir(args.imagedir)):
    folder = os.path.join(args.imagedir, sub)
    if not os.path.isdir(folder) or not sub.isdigit():
        continue
    with open(os.path.join(folder, "metadata.jsonl")) as fp:
        meta = json.load(fp)
    for name in sorted(os.listdir(os.path.join(folder, "samples"))):
        if re.match(r"\\d+\\.png", name):
            rows.append({"filename": name, "tag": meta["tag"], "prompt": meta["prompt"],
                         "correct": name == "0000.png", "reason": "", "metadata": json.dumps(meta)})
if os.path.dirname(args.outfile):
    os.makedirs(os.path.dirname(args.outfile), exist_ok=True)
with open(args.outfile, "w") as fp:
    fp.write("".join(json.dumps(r) + "\\n" for r in rows))
"""


def test_score_geneval_runs_the_evaluator_script_unchanged(tmp_path, monkeypatch):
    """The plumbing, with stand-ins for open_clip and evaluate_images.py (the real ones need mmdet and CUDA)."""
    import vargen.eval.geneval as geneval

    root = tmp_path / "images"
    _good_layout(root)
    fake = tmp_path / "site"
    fake.mkdir()
    (fake / "open_clip.py").write_text(FAKE_OPEN_CLIP)
    repo = tmp_path / "geneval"
    (repo / "evaluation").mkdir(parents=True)
    (repo / "evaluation" / "evaluate_images.py").write_text(FAKE_EVALUATOR)
    (repo / "evaluation" / "object_names.txt").write_text("bench\n")
    det = tmp_path / "det"
    det.mkdir()
    (det / "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth").write_bytes(b"")
    clip = tmp_path / "open_clip_model.safetensors"
    clip.write_bytes(b"")
    monkeypatch.setattr(geneval, "_missing_requirements", lambda *a: [])
    monkeypatch.setenv("PYTHONPATH", str(fake))
    monkeypatch.setenv("FAKE_CLIP_LOG", str(tmp_path / "clip.json"))
    summary = score_geneval(str(root), str(det), str(clip), str(repo))
    assert summary["images"] == 4 and summary["prompts"] == 2 and summary["overall"] == 0.5
    assert (root / "results.jsonl").is_file()
    assert json.loads((tmp_path / "clip.json").read_text()) == {
        "arch": "ViT-L-14", "pretrained": str(clip), "device": "cuda", "force_quick_gelu": True}
    out = tmp_path / "r" / "res.jsonl"
    score_geneval(str(root), str(det / "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth"), "openai", str(repo),
                  outfile=str(out))
    assert out.is_file() and json.loads((tmp_path / "clip.json").read_text())["pretrained"] == "openai"
