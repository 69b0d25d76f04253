import json

import pytest
import torch
from PIL import Image

from conftest import make_t2i_pipeline
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
    pipe(0, callback_on_step_end=lambda p, step, t, kw: seen.append(int(kw["committed"][0])), progress=False)
    assert seen == list(range(1, 65))
    with pytest.raises(ValueError, match="unknown class 'dog'"):
        pipe("dog")
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        pipe(12)


def test_pipeline_methods_share_one_interface():
    pipe = tiny_random_pipeline()
    greedy = dict(temperature=0, seed=3, output_type="pt", progress=False)
    ar = pipe(["class2", 7], **greedy)
    passes = []
    sjd = pipe(["class2", 7], method="sjd", method_options={"window": 8, "init": "left"},
               callback_on_step_end=lambda p, step, t, kw: passes.append(kw["committed"].tolist()), **greedy)
    assert torch.equal(ar.tokens, sjd.tokens)  # greedy SJD is greedy AR
    assert sjd.stats.method == "sjd" and passes[-1] == [64, 64] and len(passes) == max(sjd.stats.per_sample_forward_passes) - 1
    with pytest.raises(ValueError, match="unknown decoding method 'fast'"):
        pipe(0, method="fast")
    with pytest.raises(ValueError, match=r"method 'ar' takes no option\(s\) \['window'\]"):
        pipe(0, method="ar", method_options={"window": 4})


def test_mismatched_vocabularies_fail_clearly():
    gpt = LlamaGen.from_size("GPT-tiny", block_size=16, vocab_size=100, num_classes=2)
    vq = VQTokenizer(codebook_size=64, ch=32, ch_mult=(1, 2), z_channels=32)
    with pytest.raises(ValueError, match=r"model vocabulary \(100 tokens\) does not match.*\(64 codes\)"):
        VarGenPipeline(gpt=gpt, vq=vq)


def test_cli_generate_writes_image_and_stats(tmp_path, capsys):
    out, st = tmp_path / "img.png", tmp_path / "stats.json"
    assert main(["generate", "class1", "3", "--model", "tiny-random", "-o", str(out), "--stats", str(st), "-n", "2", "--quiet",
                 "--top-k", "50", "--seed", "4"]) == 0
    image = Image.open(out)
    assert image.size[0] > 64  # 4 images tiled into a grid
    stats = json.loads(st.read_text())
    assert stats["method"] == "ar" and stats["forward_passes"] == 64 and stats["tokens"] == 64
    assert stats["batch_size"] == 4 and stats["wall_s"] > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    assert main(["generate", "class1", "--model", "tiny-random", "-o", str(out), "--stats", str(st), "--quiet",
                 "--method", "sjd+coupling",
                 "--window", "4", "--init", "above"]) == 0
    stats = json.loads(st.read_text())
    assert stats["method"] == "sjd+coupling" and stats["extra"]["window"] == 4 and stats["extra"]["init"] == "above"
    # the flag spelling: --method sjd --coupling ... --relax ..., --zipar-window, --init up
    assert main(["generate", "class1", "--model", "tiny-random", "-o", str(out), "--stats", str(st), "--quiet",
                 "--method", "sjd", "--coupling", "gumbel", "--init", "up", "--window", "3"]) == 0
    stats = json.loads(st.read_text())
    assert stats["method"] == "sjd+gumbel" and stats["extra"]["init"] == "above" and stats["extra"]["window"] == 3
    assert main(["generate", "class1", "--model", "tiny-random", "-o", str(out), "--stats", str(st), "--quiet",
                 "--method", "zipar-adaptive", "--zipar-window", "4", "--min-window", "2"]) == 0
    stats = json.loads(st.read_text())
    assert stats["method"] == "zipar-adaptive" and (stats["extra"]["window"], stats["extra"]["min_window"]) == (4, 2)
    assert main(["generate", "class1", "--model", "tiny-random", "-o", str(out), "--quiet", "--method", "sjd",
                 "--coupling", "gumbel", "--relax", "lantern"]) == 2
    assert "'sjd+gumbel+lantern' is not a defined combination" in capsys.readouterr().err


def test_cli_reports_bad_arguments(tmp_path, capsys):
    assert main(["generate", "1", "-o", str(tmp_path / "x.png"), "--temperature", "-1", "--quiet"]) == 2
    assert "temperature must be >= 0" in capsys.readouterr().err
    assert main(["generate", "1", "--model", str(tmp_path / "nope"), "-o", str(tmp_path / "x.png")]) == 2
    assert "no model folder" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def _t2i_pipeline():
    return make_t2i_pipeline(["a red circle", "a blue star"])


def test_t2i_pipeline_roundtrip_and_prompt_control(tmp_path):
    pipe = _t2i_pipeline()
    a = pipe(["a red circle", "a blue star"], cfg_scale=3.0, seed=1, output_type="pt", progress=False)
    assert a.images.shape == (2, 3, 8, 8)
    pipe.save_pretrained(tmp_path / "t2i")
    loaded = VarGenPipeline.load(str(tmp_path / "t2i"))
    b = loaded(["a red circle", "a blue star"], cfg_scale=3.0, seed=1, output_type="pt", progress=False)
    assert torch.equal(a.tokens, b.tokens)
    # the prompt reaches the tokens: same seeds, other prompt, other tokens
    c = loaded(["a blue star", "a blue star"], cfg_scale=3.0, seed=1, output_type="pt", progress=False)
    assert not torch.equal(a.tokens[0], c.tokens[0]) and torch.equal(a.tokens[1], c.tokens[1])
    with pytest.warns(UserWarning, match="unknown to the text encoder.*purple"):
        loaded("a purple circle", progress=False)
    with pytest.raises(ValueError, match="prompt too long"):
        loaded("a red circle a red circle a", progress=False)


def test_t2i_without_text_encoder_fails_clearly():
    pipe = _t2i_pipeline()
    pipe = VarGenPipeline(gpt=pipe.gpt, vq=pipe.vq)
    with pytest.raises(ValueError, match="without a text encoder"):
        pipe("a red circle")


def _tiny_t5():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = ["<pad>", "</s>", "<unk>", "a", "photo", "of", "red", "circle", "blue", "star"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(words), d_model=24, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    return T5EncoderModel(config).eval(), tok


def test_llamagen_t2i_with_t5_features_left_padded():
    from vargen.models.t5 import left_pad, t5_caption_features

    t5, tok = _tiny_t5()
    feats, mask = t5_caption_features(t5, tok, ["a red circle", "a photo of a blue star"], max_length=8)
    assert mask.tolist()[0] == [False] * 5 + [True] * 3 and mask[1].sum() == 6
    assert torch.all(feats[~mask] == 0)
    # the real tokens' features are T5's own, moved to the end
    ids = tok(["a red circle"], return_tensors="pt")["input_ids"]
    ref = t5(input_ids=ids)["last_hidden_state"][0]
    torch.testing.assert_close(feats[0, 5:], ref)
    f2, m2 = left_pad(torch.arange(4.0).view(1, 4, 1), torch.tensor([[1, 1, 0, 0]]))
    assert f2.flatten().tolist() == [0, 0, 0, 1] and m2.tolist() == [[False, False, True, True]]
    with pytest.warns(UserWarning, match="prompt 0 has 9 T5 tokens and the model takes 8: the last 1 were cut"):
        _, cut = t5_caption_features(t5, tok, ["a photo of a red circle a blue star"], max_length=8)
    assert cut.all()  # cut to the caption length, as LlamaGen truncates
    # through the pipeline, with a LlamaGen t2i GPT taking 24-d caption features
    gpt = LlamaGen.from_size("GPT-tiny", model_type="t2i", block_size=16, vocab_size=64, caption_dim=24,
                             cls_token_num=8).eval()
    vq = VQTokenizer(codebook_size=64, ch=32, ch_mult=(1, 2), z_channels=32).eval()
    out = VarGenPipeline(gpt=gpt, vq=vq, text_encoder=t5, tokenizer=tok)("a red circle", cfg_scale=2.0,
                                                                          progress=False, output_type="pt")
    assert out.tokens.shape == (1, 16)
