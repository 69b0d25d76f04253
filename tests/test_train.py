import functools
import json

import pytest
import torch

from vargen.cli import main
from vargen.errors import UsageError
from vargen.models import LlamaGen
from vargen.models.text import WordTextEncoder, build_vocabulary
from vargen.tokenizers import VQTokenizer
from vargen.train.ar import ar_step, train_ar
from vargen.train.tokenizer import train_tokenizer, vq_step

VQ_MODEL = {"codebook_size": 64, "ch": 32, "ch_mult": [1, 2], "z_channels": 32, "num_res_blocks": 1}
SCENES = [{"name": "scenes", "resolution": 16, "seed": 0, "length": 64}]


def _tiny_t2i(tmp_path, **overrides) -> dict:
    """A 1-step tokenizer run under ``tmp_path / "vq_run"`` and a GPT-tiny t2i AR config on 8 of its scenes."""
    vq_dir = tmp_path / "vq_run"
    if not (vq_dir / "vq").exists():
        train_tokenizer({"model": VQ_MODEL, "data": SCENES, "steps": 1, "batch_size": 4, "lr": 1e-3}, str(vq_dir))
    return {"tokenizer": str(vq_dir / "vq"), "data": SCENES, "num_images": 8,
            "model": {"size": "GPT-tiny", "model_type": "t2i"},
            "text_encoder": {"caption_dim": 32, "width": 32, "layers": 1, "heads": 2, "max_length": 12},
            "steps": 2, "batch_size": 4, "lr": 1e-3, "log_every": 1, **overrides}


def _steps_reduce_loss(modules, batch, step_fn, n=5, lr=3e-3):
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    first = None
    for _ in range(n):
        loss, _ = step_fn(modules, batch)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return first, step_fn(modules, batch)[0].item()


def test_vq_training_steps_reduce_loss():
    torch.manual_seed(0)
    vq = VQTokenizer(**VQ_MODEL).train()
    batch = {"image": torch.rand(4, 3, 16, 16) * 2 - 1}
    before, after = _steps_reduce_loss({"vq": vq}, batch, vq_step)
    assert after < before


@pytest.mark.parametrize("model_type", ["c2i", "t2i"])
def test_ar_training_steps_reduce_loss(model_type):
    torch.manual_seed(0)
    batch = {"tokens": torch.randint(0, 32, (4, 16)), "captions": ["a red circle", "two stars", "a", "blue"],
             "labels": torch.tensor([0, 1, 2, 1])}
    modules = {}
    if model_type == "t2i":
        modules["text_encoder"] = WordTextEncoder(vocabulary=build_vocabulary(batch["captions"]), caption_dim=32,
                                                  width=32, layers=1, heads=2, max_length=4)
    modules["gpt"] = LlamaGen.from_size("GPT-tiny", model_type=model_type, vocab_size=32, block_size=16,
                                        num_classes=3, caption_dim=32, cls_token_num=4).train()
    before, after = _steps_reduce_loss(modules, batch, ar_step)
    assert after < before - 0.1


def test_text_encoder_left_pads_and_reports_unknown_words():
    enc = WordTextEncoder(vocabulary=build_vocabulary(["a red circle", "a blue star"]), caption_dim=8, width=16,
                          layers=1, heads=2, max_length=5)
    ids, mask = enc.tokenize(["a red star", "purple circle"])
    assert mask.tolist() == [[False, False, True, True, True], [False, False, False, True, True]]
    assert ids[1, 3].item() == 1  # "purple" -> <unk>
    assert enc.unknown_words(["purple circle", "a red star"]) == ["purple"]
    feats, mask = enc(["a red star", ""])
    assert feats.shape == (2, 5, 8) and torch.all(feats[~mask] == 0)
    with pytest.raises(ValueError, match="prompt too long: 6 words.*at most 5"):
        enc.tokenize(["a b c d e f"])


def test_tokenizer_recipe_resumes_and_saves(tmp_path):
    config = {"model": VQ_MODEL, "data": SCENES, "steps": 4, "batch_size": 4, "lr": 1e-3, "log_every": 2,
              "save_every": 2}
    result = train_tokenizer(config, str(tmp_path))
    assert result["steps"] == 4 and (tmp_path / "vq" / "diffusion_pytorch_model.safetensors").exists()
    assert (tmp_path / "loss.png").exists() and (tmp_path / "state" / "step.json").exists()
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and "psnr" in rows[0] and "batch_code_usage" in rows[0]
    # a rerun with more steps resumes from step 4 instead of starting over
    config["steps"] = 6
    result = train_tokenizer(config, str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert rows[2]["elapsed_s"] > rows[1]["elapsed_s"]  # training time accumulates across the resume
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["steps"] == 6 and run["device"] == "cpu" and "CPU" in run["device_name"]
    assert VQTokenizer.from_pretrained(str(tmp_path / "vq")).vocab_size == 64


def test_ar_recipe_via_cli(tmp_path):
    config = _tiny_t2i(tmp_path, num_images=16)
    cfg_path = tmp_path / "ar.json"
    cfg_path.write_text(json.dumps(config))
    assert main(["train", "ar", "--config", str(cfg_path), "--out", str(tmp_path / "ar")]) == 0
    gpt = LlamaGen.from_pretrained(str(tmp_path / "ar" / "gpt"))
    assert gpt.config.model_type == "t2i" and gpt.num_tokens == 64 and gpt.config.cls_token_num == 12
    assert WordTextEncoder.from_pretrained(str(tmp_path / "ar" / "text_encoder")).config.max_length == 12



def test_token_cache_is_shared_and_refused_for_other_weights_or_data(tmp_path, monkeypatch):
    import vargen.train.ar as ar

    vq_dir = tmp_path / "vq_run"
    train_tokenizer({"model": VQ_MODEL, "data": SCENES, "steps": 1, "batch_size": 4, "lr": 1e-3}, str(vq_dir))
    shared = str(tmp_path / "shared" / "tokens.pt")
    config = {"tokenizer": str(vq_dir / "vq"), "data": SCENES, "num_images": 6, "token_cache": shared}
    _, made = ar.load_token_cache(config, str(tmp_path / "ar"))
    assert made["tokens"].shape[0] == 6 and not (tmp_path / "ar" / "tokens.pt").exists()

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(ar, "tokenize_dataset", no_tokenising)
    _, again = ar.load_token_cache(config, str(tmp_path / "lpd"))  # another recipe's run reads the same file
    assert torch.equal(again["tokens"], made["tokens"])
    with pytest.raises(ValueError, match="another num_images"):
        ar.load_token_cache({**config, "num_images": 5}, str(tmp_path / "lpd"))
    other = VQTokenizer.from_pretrained(str(vq_dir / "vq"))
    with torch.no_grad():
        other.quantize.embedding.weight.mul_(2)
    other.save_pretrained(str(tmp_path / "other_vq"))
    with pytest.raises(ValueError, match="another tokenizer"):
        ar.load_token_cache({**config, "tokenizer": str(tmp_path / "other_vq")}, str(tmp_path / "lpd"))

def test_missing_config_fails_clearly(tmp_path, capsys):
    assert main(["train", "tokenizer", "--config", str(tmp_path / "none.json")]) == 2
    assert "config not found" in capsys.readouterr().err


def test_export_writes_fp16_pipeline_card_and_samples(tmp_path):
    from vargen.pipeline import VarGenPipeline
    from vargen.train.export import export_model

    vq_dir, ar_dir = tmp_path / "vq_run", tmp_path / "ar_run"
    train_tokenizer({"model": VQ_MODEL, "data": SCENES, "steps": 1, "batch_size": 4, "lr": 1e-3}, str(vq_dir))
    train_ar({"tokenizer": str(vq_dir / "vq"), "data": SCENES, "num_images": 8,
              "model": {"size": "GPT-tiny", "model_type": "t2i"},
              "text_encoder": {"caption_dim": 32, "width": 32, "layers": 1, "heads": 2, "max_length": 12},
              "steps": 1, "batch_size": 4, "lr": 1e-3, "log_every": 1}, str(ar_dir))
    card = export_model("toy", str(vq_dir), str(ar_dir), str(tmp_path / "out"), ["a photo of a red circle", "a photo of a star"],
                        {"scenes": SCENES}, cfg_scale=2.0)
    assert "CPU" in card["vq_device"] and "CPU" in card["ar_device"]
    assert set(card["reconstruction_psnr_db"]) == {"scenes"} and card["reconstruction_psnr_db"]["scenes"] > 0
    assert (tmp_path / "out" / "samples.png").exists() and "toy" in (tmp_path / "out" / "MODEL_CARD.md").read_text()
    from safetensors.torch import load_file
    assert all(t.dtype == torch.float16 for t in load_file(str(tmp_path / "out" / "gpt" /
                                                              "diffusion_pytorch_model.safetensors")).values())
    pipe = VarGenPipeline.load(str(tmp_path / "out"))
    assert pipe.gpt.output.weight.dtype == torch.float32
    assert pipe("a photo of a red circle", progress=False, output_type="pt").images.shape == (1, 3, 16, 16)


def test_tokenizer_second_phase_starts_from_saved_weights(tmp_path):
    first = {"model": VQ_MODEL, "data": SCENES, "steps": 2, "batch_size": 4, "lr": 1e-3, "crop": 8}
    train_tokenizer(first, str(tmp_path / "crops"))
    saved = VQTokenizer.from_pretrained(str(tmp_path / "crops" / "vq"))
    # full-image phase with a vanishing learning rate: the weights stay those of phase one
    second = {"init": str(tmp_path / "crops" / "vq"), "data": SCENES, "steps": 1, "batch_size": 4, "lr": 1e-12}
    train_tokenizer(second, str(tmp_path / "full"))
    tuned = VQTokenizer.from_pretrained(str(tmp_path / "full" / "vq"))
    assert tuned.config.codebook_size == 64
    for (name, a), b in zip(saved.named_parameters(), tuned.parameters()):  # (usage buffers do move)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    fresh = VQTokenizer(**VQ_MODEL)
    assert not torch.allclose(fresh.encoder.conv_in.weight, tuned.encoder.conv_in.weight)


def test_decoder_only_finetune_keeps_every_token_id(tmp_path):
    """``"train": "decoder"`` moves the decoder but not one token id: models trained on the codes stay valid."""
    torch.manual_seed(0)
    # dead-code restarts every step: in train mode they would move the codebook at once
    base = VQTokenizer(**{**VQ_MODEL, "dead_code_restart_every": 1}).eval()
    base.save_pretrained(str(tmp_path / "base"))
    config = {"init": str(tmp_path / "base"), "train": "decoder", "data": SCENES, "steps": 4, "batch_size": 4,
              "lr": 3e-3}
    images = torch.rand(6, 3, 16, 16) * 2 - 1
    for run, extra in (("dec", {}), ("dec_table", {"decode_codebook": True})):
        train_tokenizer({**config, **extra}, str(tmp_path / run))
        tuned = VQTokenizer.from_pretrained(str(tmp_path / run / "vq"))
        assert torch.equal(base.encode(images), tuned.encode(images))
        for name, p in base.named_parameters():
            q = dict(tuned.named_parameters())[name]
            if name.startswith(("encoder.", "quant_conv.", "quantize.")):
                assert torch.equal(p, q), name
        assert not torch.equal(base.decoder.conv_out.weight, tuned.decoder.conv_out.weight)
        assert not torch.equal(base.post_quant_conv.weight, tuned.post_quant_conv.weight)
    # the decode codebook is saved, loaded and trained; the quantiser's codebook is not touched
    assert tuned.config.decode_codebook and not torch.allclose(tuned.decode_table, base.codebook_embeddings)
    torch.testing.assert_close(tuned.codebook_embeddings, base.codebook_embeddings)


def test_decode_codebook_starts_as_the_codebook():
    torch.manual_seed(0)
    vq = VQTokenizer(**VQ_MODEL).eval()
    tokens = torch.randint(0, 64, (2, 4, 4))
    before = vq.decode(tokens)
    assert vq.add_decode_codebook() is vq and vq.config.decode_codebook
    torch.testing.assert_close(vq.decode(tokens), before)  # same images until it is trained
    with torch.no_grad():
        vq.decode_embedding.weight[tokens[0, 0, 0]] += 1.0
    assert not torch.allclose(vq.decode(tokens), before)
    assert torch.equal(vq.codebook_embeddings, vq.quantize.codebook())  # lookups never read the decode table
    with pytest.raises(ValueError, match="set 'train': 'decoder'"):
        train_tokenizer({"model": VQ_MODEL, "decode_codebook": True, "data": SCENES, "steps": 1, "batch_size": 4,
                         "lr": 1e-3}, "/nonexistent-never-written")


def test_decoder_only_step_reduces_loss():
    torch.manual_seed(0)
    vq = VQTokenizer(**VQ_MODEL).train()
    batch = {"image": torch.rand(4, 3, 16, 16) * 2 - 1}
    before, after = _steps_reduce_loss({"vq": vq}, batch, functools.partial(vq_step, decoder_only=True))
    assert after < before


def test_decoder_only_needs_a_trained_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="set 'init'"):
        train_tokenizer({"model": VQ_MODEL, "train": "decoder", "data": SCENES, "steps": 1, "batch_size": 4,
                         "lr": 1e-3}, str(tmp_path))
    with pytest.raises(ValueError, match="'all' or 'decoder'"):
        train_tokenizer({"model": VQ_MODEL, "train": "encoder", "data": SCENES, "steps": 1, "batch_size": 4,
                         "lr": 1e-3}, str(tmp_path))


def test_foreground_weights_single_out_objects_and_keep_the_mean():
    from vargen.train.tokenizer import foreground_weights

    images = -0.2 * torch.ones(2, 3, 8, 8)
    images[0, 2, 2:4, 2:4] = 0.9  # a 2 x 2 blue-ish object on grey; image 1 is all background
    w = foreground_weights(images, 9.0)
    torch.testing.assert_close(w.mean(dim=(1, 2, 3)), torch.ones(2))
    assert w[0, 0, 2, 2] / w[0, 0, 0, 0] == pytest.approx(10.0) and torch.all(w[1] == 1)


def test_foreground_weighted_step_reduces_the_object_error():
    torch.manual_seed(0)
    vq = VQTokenizer(**VQ_MODEL).train()
    images = -0.2 * torch.ones(4, 3, 16, 16)
    images[:, 2, 4:8, 4:8] = 0.9
    step = functools.partial(vq_step, decoder_only=True, foreground_weight=9.0)
    before, after = _steps_reduce_loss({"vq": vq}, {"image": images}, step)
    assert after < before


def test_ar_init_continues_a_finished_run_and_refuses_a_mismatch(tmp_path):
    base = _tiny_t2i(tmp_path)
    vq_dir, model = tmp_path / "vq_run", base["model"]
    train_ar(base, str(tmp_path / "first"))
    first = LlamaGen.from_pretrained(str(tmp_path / "first" / "gpt"))
    # a second phase with a vanishing learning rate keeps phase one's weights (a fresh model would differ
    # everywhere); its schedule and optimiser are new (its own state/)
    train_ar({**base, "init": str(tmp_path / "first"), "lr": 1e-12, "steps": 1},
             str(tmp_path / "second"))
    second = LlamaGen.from_pretrained(str(tmp_path / "second" / "gpt"))
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
    assert json.loads((tmp_path / "second" / "run.json").read_text())["steps"] == 1
    with pytest.raises(ValueError, match="sets n_layer unlike the saved model"):
        train_ar({**base, "model": {**model, "n_layer": 7}, "init": str(tmp_path / "first")}, str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="never saw .*hexagonal"):
        from vargen.train import ar
        cache = torch.load(tmp_path / "first" / "tokens.pt")
        cache["captions"] = [c + " hexagonal" for c in cache["captions"]]
        ar._continued_modules({"init": str(tmp_path / "first")}, VQTokenizer.from_pretrained(str(vq_dir / "vq")),
                              cache)


def test_ar_compile_trains_like_eager(tmp_path):
    config = _tiny_t2i(tmp_path, steps=3)
    train_ar(config, str(tmp_path / "eager"))
    train_ar({**config, "compile": True}, str(tmp_path / "compiled"))

    def losses(run):
        return [json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]

    # same seed, same batches: every step's loss (each after the previous updates) agrees up to bf16 rounding
    assert len(losses("compiled")) == 3
    assert losses("compiled") == pytest.approx(losses("eager"), abs=2e-2)


def test_export_of_a_phased_run_sums_its_phases(tmp_path):
    from vargen.train.export import export_model

    base = _tiny_t2i(tmp_path)
    vq_dir = tmp_path / "vq_run"
    train_ar(base, str(tmp_path / "p1"))
    train_ar({**base, "init": str(tmp_path / "p1"), "steps": 3}, str(tmp_path / "p2"))
    card = export_model("toy", str(vq_dir), [str(tmp_path / "p1"), str(tmp_path / "p2")], str(tmp_path / "out"),
                        ["a photo of a star"], {"scenes": SCENES})
    assert card["ar_final"]["step"] == 5 and [p["step"] for p in card["ar_final"]["phases"]] == [2, 3]
    assert "| steps | 1 | 5 (2 + 3) |" in (tmp_path / "out" / "MODEL_CARD.md").read_text()
    second = LlamaGen.from_pretrained(str(tmp_path / "p2" / "gpt")).state_dict()
    shipped = LlamaGen.from_pretrained(str(tmp_path / "out" / "gpt")).state_dict()
    assert all(torch.allclose(second[k].half().float(), shipped[k].float()) for k in second)  # the last phase's weights
    with pytest.raises(UsageError, match="run list is empty"):
        export_model("toy", str(vq_dir), [], str(tmp_path / "none"), ["a star"], {"scenes": SCENES})
