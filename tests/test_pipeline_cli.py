import json

import pytest
import torch
from PIL import Image

from vargen.cli import main
from vargen.models import LlamaGen
from vargen.pipeline import VarGenPipeline, tiny_random_pipeline
from vargen.tokenizers import VQTokenizer


def test_pipeline_save_load_roundtrip_gives_identical_images(tmp_path):
    pipe = tiny_random_pipeline()
    a = pipe(["class2", 7], seed=5, output_type="pt", progress=False)
    pipe.save_pretrained(tmp_path / "m")
    b = VarGenPipeline.load(str(tmp_path / "m"))(["class2", 7], seed=5, output_type="pt", progress=False)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.images, b.images)
    assert a.images.shape == (2, 3, 64, 64)


def test_pipeline_callback_and_bad_classes():
    pipe = tiny_random_pipeline()
    seen = []
    pipe(0, callback_on_step_end=lambda p, step, t, kw: seen.append(kw["tokens"].shape[1]), progress=False)
    assert seen == list(range(1, 65))
    with pytest.raises(ValueError, match="unknown class 'dog'"):
        pipe("dog")
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        pipe(12)


def test_mismatched_vocabularies_fail_clearly():
    gpt = LlamaGen.from_size("GPT-tiny", block_size=16, vocab_size=100, num_classes=2)
    vq = VQTokenizer(codebook_size=64, ch=32, ch_mult=(1, 2), z_channels=32)
    with pytest.raises(ValueError, match=r"model vocabulary \(100 tokens\) does not match.*\(64 codes\)"):
        VarGenPipeline(gpt=gpt, vq=vq)


def test_cli_generate_writes_image_and_stats(tmp_path, capsys):
    out, st = tmp_path / "img.png", tmp_path / "stats.json"
    assert main(["generate", "class1", "3", "-o", str(out), "--stats", str(st), "-n", "2", "--quiet",
                 "--top-k", "50", "--seed", "4"]) == 0
    image = Image.open(out)
    assert image.size[0] > 64  # 4 images tiled into a grid
    stats = json.loads(st.read_text())
    assert stats["method"] == "ar" and stats["forward_passes"] == 64 and stats["tokens"] == 64
    assert stats["batch_size"] == 4 and stats["wall_s"] > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_cli_reports_bad_arguments(tmp_path, capsys):
    assert main(["generate", "1", "-o", str(tmp_path / "x.png"), "--temperature", "-1", "--quiet"]) == 2
    assert "temperature must be >= 0" in capsys.readouterr().err
    assert main(["generate", "1", "--model", str(tmp_path / "nope"), "-o", str(tmp_path / "x.png")]) == 2
    assert "no model folder" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
