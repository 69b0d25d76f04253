"""`vargen convert`: LlamaGen's released file formats -> a pipeline folder every command takes."""
import warnings

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from official_files import Payload, llamagen_args, tiny_gpt, tiny_t5, tiny_vq, write_gpt, write_vq
from vargen.cli import main
from vargen.models.t5 import clean_prompt, load_t5, t5_caption_features
from vargen.pipeline import VarGenPipeline

# prompts and what LlamaGen's T5Embedder.text_preprocessing makes of them (worked through its rules by hand)
CLEANED = {
    "A Photo of a CAT on https://example.com/cat.jpg!!": "a photo of a cat on .!!",
    "Check www.site.org: a <b>Dog</b> &amp; friend": "check: a dog friend",
    '"***SALE*** Red car (new) | 50% off..."': "sale red car new 50% off",
    "this-is-my-cute-cat_on_a-mat": "this is my cute cat on a mat",
}
WORDS = "a photo of cat on . !! check : dog friend sale red car new 50 % off this is my cute mat".split()


def c2i_files(tmp_path, **args):
    gpt = write_gpt(tmp_path / "c2i_tiny_256.pt", tiny_gpt(),
                    llamagen_args(**{"gpt_model": "GPT-tiny", "vocab_size": 64, **args}))
    return gpt, write_vq(tmp_path / "vq_ds16_c2i.pt", tiny_vq())


def test_convert_c2i_then_generate_sjd_gives_a_256px_image(tmp_path, capsys, one_thread):
    gpt, vq = c2i_files(tmp_path)
    folder = tmp_path / "llamagen-c2i"
    assert main(["convert", "llamagen", "--gpt", gpt, "--vq", vq, "-o", str(folder)]) == 0
    assert "16 x 16 tokens -> 256 x 256 px" in capsys.readouterr().out
    out = tmp_path / "img.png"
    assert main(["generate", "--model", str(folder), "207", "--method", "sjd", "-o", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert Image.open(out).size == (256, 256)
    # --quiet: no third-party loading chatter
    assert "float32" not in captured.err and "Loading pipeline components" not in captured.err, captured.err
    pipe = VarGenPipeline.from_pretrained(str(folder))
    assert pipe.gpt.config.num_classes == 1000 and pipe.gpt.num_tokens == 256
    assert main(["sample", "--model", str(folder), "-n", "1", "--out", str(tmp_path / "samples"), "--cfg", "1",
                 "--quiet"]) == 0
    assert Image.open(tmp_path / "samples" / "000000.png").size == (256, 256)


def test_image_size_comes_from_the_files_args_and_flags_must_agree(tmp_path, capsys):
    gpt, vq = c2i_files(tmp_path, image_size=384)
    folder = tmp_path / "m384"
    assert main(["convert", "llamagen", "--gpt", gpt, "--vq", vq, "-o", str(folder), "--dtype", "bf16"]) == 0
    assert VarGenPipeline.load(str(folder)).gpt.grid == (24, 24)  # 576 tokens without --image-size
    with safe_open(str(folder / "gpt" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor("tok_embeddings.weight").dtype == torch.bfloat16
    assert main(["convert", "llamagen", "--gpt", gpt, "--vq", vq, "-o", str(tmp_path / "x"), "--image-size", "256"]) == 2
    assert "image size: you gave 256 but the checkpoint's args gives 384" in capsys.readouterr().err
    assert main(["convert", "llamagen", "--gpt", gpt, "--vq", vq, "-o", str(tmp_path / "x"), "--size", "GPT-mini"]) == 2
    assert "you gave 'GPT-mini' but the checkpoint's weights gives 'GPT-tiny'" in capsys.readouterr().err
    assert main(["convert", "llamagen", "--gpt", gpt, "--vq", vq, "-o", str(folder)]) == 2  # never overwrites silently
    assert "pass --overwrite" in capsys.readouterr().err


def test_raw_fsdp_file_without_args_takes_its_grid_from_the_flags(tmp_path):
    gpt = write_gpt(tmp_path / "consolidated.pth", tiny_gpt(image_size=128, downsample=8))
    vq = write_vq(tmp_path / "vq_ds8.pt", tiny_vq(downsample=8))
    folder = tmp_path / "m"
    assert main(["convert", "llamagen", "--gpt", gpt, "--vq", vq, "--image-size", "128", "-o", str(folder)]) == 0
    pipe = VarGenPipeline.load(str(folder))
    assert pipe.gpt.grid == (16, 16) and pipe.vq.downsample == 8  # the grid follows the VQ-8 found in --vq


def test_checkpoint_files_given_as_model_say_how_to_convert(tmp_path, capsys):
    gpt, _ = c2i_files(tmp_path)
    for model in (gpt, str(tmp_path)):
        assert main(["generate", "--model", model, "207", "-o", str(tmp_path / "x.png")]) == 2
        assert "vargen convert llamagen --gpt" in capsys.readouterr().err


def test_convert_refuses_a_payload_and_never_runs_it(tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    gpt, vq = c2i_files(tmp_path, evil=Payload(marker))
    assert main(["convert", "llamagen", "--gpt", gpt, "--vq", vq, "-o", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "posix.system" in err and "--trust-checkpoint" in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "m").exists()
    assert main(["convert", "llamagen", "--gpt", gpt, "--vq", vq, "-o", str(tmp_path / "m"), "--trust-checkpoint"]) == 0
    assert marker.exists()  # the opt-in does unpickle it: the refusal above is what kept it from running


def test_caption_cleaning_follows_llamagen():
    for prompt, cleaned in CLEANED.items():
        assert clean_prompt(prompt) == cleaned, prompt


def llamagen_t5_features(encoder, tokenizer, cleaned, max_length):
    """LlamaGen's path, re-done: T5Embedder.get_text_embeddings then sample_t2i.py's left padding."""
    batch = tokenizer(cleaned, max_length=max_length, padding="max_length", truncation=True,
                      return_attention_mask=True, add_special_tokens=True, return_tensors="pt")
    embs = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])["last_hidden_state"]
    masks = batch["attention_mask"]
    new_masks = torch.flip(masks, dims=[-1])
    new_embs = torch.stack([torch.cat([e[int(m.sum()):], e[:int(m.sum())]]) for e, m in zip(embs, masks)])
    return new_embs * new_masks[:, :, None], new_masks


@torch.no_grad()
def test_t5_features_equal_llamagens_path(tmp_path):
    encoder, tokenizer = load_t5(tiny_t5(tmp_path / "t5", WORDS))
    feats, mask = t5_caption_features(encoder, tokenizer, list(CLEANED), max_length=120)
    ref, ref_mask = llamagen_t5_features(encoder, tokenizer, list(CLEANED.values()), 120)
    assert torch.equal(mask, ref_mask.bool())
    torch.testing.assert_close(feats, ref)
    raw, _ = llamagen_t5_features(encoder, tokenizer, list(CLEANED), 120)
    assert not torch.allclose(feats, raw)  # cleaning changes what T5 sees
    with pytest.warns(UserWarning, match="prompt 0 has 131 T5 tokens and the model takes 120: the last 11 were cut"):
        long, _ = t5_caption_features(encoder, tokenizer, ["red car " * 65], max_length=120)
    torch.testing.assert_close(long, llamagen_t5_features(encoder, tokenizer, ["red car " * 65], 120)[0])


def test_convert_t2i_with_t5_then_generate(tmp_path, capsys, one_thread):
    gpt = write_gpt(tmp_path / "t2i_tiny_256.pt", tiny_gpt("t2i", caption_dim=32),
                    llamagen_args(gpt_model="GPT-tiny", gpt_type="t2i", vocab_size=64, cls_token_num=120))
    vq = write_vq(tmp_path / "vq_ds16_t2i.pt", tiny_vq())
    folder = tmp_path / "llamagen-t2i"
    assert main(["convert", "llamagen", "--gpt", gpt, "--vq", vq, "-o", str(folder)]) == 2
    assert "--t5 DIR" in capsys.readouterr().err
    t5 = tiny_t5(tmp_path / "flan-t5", WORDS)
    assert main(["convert", "llamagen", "--gpt", gpt, "--vq", vq, "--t5", t5, "-o", str(folder)]) == 0
    out = tmp_path / "t2i.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a short prompt is not cut
        assert main(["generate", "--model", str(folder), "A Photo of a CAT", "--method", "sjd", "-o", str(out),
                     "--quiet"]) == 0
    assert Image.open(out).size == (256, 256)
    pipe = VarGenPipeline.load(str(folder))
    encoder, tokenizer = load_t5(t5)
    want = llamagen_t5_features(encoder, tokenizer, ["a photo of a cat"], 120)[0]
    torch.testing.assert_close(pipe.parse_conditions(["A Photo of a CAT"])[0], want)


def test_export_pointed_at_checkpoint_files_says_how_to_convert(tmp_path, capsys):
    import json

    gpt, vq = c2i_files(tmp_path)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"name": "x", "vq_run": vq, "ar_run": gpt, "out": str(tmp_path / "out"),
                                "prompts": [0], "eval_data": {}}))
    assert main(["export", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "vargen convert llamagen" in err and "Traceback" not in err
