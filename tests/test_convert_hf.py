"""`vargen convert hf DIR` and `--model hf:DIR`: Hugging Face folders (tiny random Janus, Emu3,
Chameleon models with word-level processors, saved to disk) through the CLI and the pipeline."""
import json

import pytest
import torch
from PIL import Image

from test_hf_models import make_adapter
from vargen.cli import main
from vargen.pipeline import VarGenPipeline

WORDS = ["a", "photo", "of", "cat", "red", "apple"]


def _tokenizer(vocab, specials, add_bos=True, **kw):
    """A word-level fast tokenizer; ``add_bos`` as Llama-style tokenizers (Emu3's GPT-style one does not:
    its processor adds BOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # "3*4" -> 3, *, 4 (Emu3's size header)
    tok.add_special_tokens(specials)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                           special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", **kw)


def _words(first_id):
    return {w: first_id + i for i, w in enumerate(WORDS)}


def _janus_processor():
    from transformers import JanusImageProcessor, JanusProcessor

    specials = {"<begin_of_image>": 4, "<end_of_image>": 5, "<image_placeholder>": 6}  # BOI 4 as in the config
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2, "<pad>": 3, **specials, "User": 7, ":": 8, **_words(11)}
    tok = _tokenizer(vocab, list(specials), extra_special_tokens={
        "image_token": "<image_placeholder>", "boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>"})
    template = "{% for m in messages %}User : {{ m['content'][0]['text'] }}{% endfor %}"
    return JanusProcessor(JanusImageProcessor(), tok, chat_template=template)


def _emu3_processor():
    from transformers import Emu3ImageProcessor, Emu3Processor

    # ids as the tiny Emu3 config's vocabulary_map: BOI 62, <|image token|> 63, ...
    specials = {"<|extra_200|>": 60, "<image>": 61, "<|image start|>": 62, "<|image token|>": 63, "<|image end|>": 64,
                "<|extra_201|>": 65}
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, **{str(d): 4 + d for d in range(10)}, "*": 14,
             **_words(20), **specials}
    tok = _tokenizer(vocab, list(specials), add_bos=False, extra_special_tokens={
        "image_token": "<image>", "boi_token": "<|image start|>", "eoi_token": "<|image end|>",
        "image_wrapper_token": "<|image token|>", "eof_token": "<|extra_201|>"})
    return Emu3Processor(Emu3ImageProcessor(), tok)


def _chameleon_tokenizer():
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, **_words(20)}  # ids 4.. are image codes
    return _tokenizer(vocab, [])


def write_hf_folder(path, family):
    """A tiny random checkpoint folder of ``family`` as the releases lay it out: config, weights, processor."""
    model = make_adapter(family)
    model.hf.save_pretrained(path)
    {"janus": _janus_processor, "emu3": _emu3_processor, "lumina": _chameleon_tokenizer,
     "anole": _chameleon_tokenizer}[family]().save_pretrained(path)
    return str(path)


# families with a VQ decoder in transformers, the convert flags each needs, and the image size
DECODING = {"janus": ([], (8, 8)), "emu3": (["--grid", "3x4"], (8, 6))}  # the tiny VQs upsample 2x


# "a red apple" as each family's processor builds it from the tokenizers above
PROMPT_IDS = {"janus": [1, 7, 8, 11, 15, 16, 4],  # BOS "User :" a red apple BOI
              "emu3": [1, 20, 24, 25, 62, 7, 14, 8, 63]}  # BOS a red apple BOI "3 * 4" <|image token|>


@pytest.mark.parametrize("family", sorted(DECODING))
def test_convert_hf_then_generate_sample_and_from_pretrained(family, tmp_path, capsys, one_thread):
    flags, size = DECODING[family]
    hf_dir = write_hf_folder(tmp_path / family, family)
    out = tmp_path / "pipe"
    assert main(["convert", "hf", hf_dir, "-o", str(out), "--max-prompt-len", "32", *flags]) == 0
    said = capsys.readouterr().out
    assert f"referencing {hf_dir}" in said and "not copied" in said
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "HFImagePipeline" and index["hf_folder"] == hf_dir
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json"]  # the weights stay where they are

    image = tmp_path / "img.png"
    assert main(["generate", "--model", str(out), "a photo of a cat", "--method", "sjd", "--cfg", "3",
                 "-o", str(image), "--quiet"]) == 0
    assert Image.open(image).size == size
    assert main(["sample", "--model", str(out), "-n", "2", "--out", str(tmp_path / "samples"), "--quiet"]) == 0
    assert Image.open(tmp_path / "samples" / "000001.png").size == size

    pipe = VarGenPipeline.from_pretrained(str(out))
    assert type(pipe).__name__ == "HFImagePipeline" and pipe.gpt.family == family
    greedy = dict(cfg_scale=3.0, temperature=0.0, output_type="latent", progress=False)
    sjd, ar = (pipe(["a red apple", "a cat"], method=m, **greedy).tokens for m in ("sjd", "ar"))
    assert sjd.shape == (2, pipe.gpt.num_tokens) and torch.equal(sjd, ar)  # greedy SJD is exactly greedy AR
    # prompts go through the folder's processor: chat template / BOS, words, the image header
    assert pipe.parse_conditions(["a red apple"])[0] == [PROMPT_IDS[family]]


def test_model_hf_dir_takes_the_folder_directly(tmp_path, capsys, one_thread):
    hf_dir = write_hf_folder(tmp_path / "janus", "janus")
    image = tmp_path / "img.png"
    assert main(["generate", "--model", f"hf:{hf_dir}", "a cat", "a red apple", "--method", "sjd", "-o", str(image),
                 "--quiet"]) == 0
    assert Image.open(image).size == (2 * 8 + 3 * 2, 8 + 2 * 2)  # two images tiled with 2 px padding
    assert main(["bench", "speed", "--model", f"hf:{hf_dir}", "--methods", "sjd", "-n", "2", "--batch-size", "2"]) == 0
    assert "sjd" in capsys.readouterr().out


def test_chameleon_makes_tokens_but_no_images(tmp_path, capsys, one_thread):
    """transformers has no Chameleon VQ decoder: tokens from Python, a clear error before any decoding from the CLI."""
    hf_dir = write_hf_folder(tmp_path / "lumina", "lumina")
    out = tmp_path / "pipe"
    assert main(["convert", "hf", hf_dir, "-o", str(out), "--grid", "4x6", "--row-separator", "lumina",
                 "--max-prompt-len", "32"]) == 0
    assert "no image decoder" in capsys.readouterr().out
    pipe = VarGenPipeline.load(str(out))
    assert pipe.gpt.grid == (4, 6) and pipe.gpt.separators
    tokens = pipe("a cat", seed=0, method="sjd", output_type="latent", progress=False).images
    assert tokens.shape == (1, 24) and int(tokens.max()) < pipe.gpt.vocab_size
    assert main(["generate", "--model", str(out), "a cat", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "no image decoder in transformers" in err and "output_type='latent'" in err
    assert not (tmp_path / "x.png").exists()
    assert main(["sample", "--model", str(out), "-n", "1", "--out", str(tmp_path / "s")]) == 2
    assert "no image decoder" in capsys.readouterr().err and not (tmp_path / "s").exists()
    assert main(["bench", "speed", "--model", str(out), "--methods", "sjd", "-n", "1", "--batch-size", "1"]) == 0
    assert "sjd" in capsys.readouterr().out  # timing needs no pixels


def test_errors_exit_2_with_what_to_do(tmp_path, capsys):
    from transformers import LlamaConfig

    def fails(argv, *expected):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        for text in expected:
            assert text in err, err

    missing = str(tmp_path / "nowhere")
    fails(["convert", "hf", missing, "-o", str(tmp_path / "o")], "no Hugging Face folder at", "nothing is downloaded")
    fails(["generate", "--model", f"hf:{missing}", "a cat"], "no Hugging Face folder at")
    llama = tmp_path / "llama"
    LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(llama)
    fails(["convert", "hf", str(llama), "-o", str(tmp_path / "o")], "model_type 'llama' is not supported",
          "chameleon, emu3, janus", "Janus-Pro", "Lumina-mGPT")
    fails(["generate", "--model", str(llama), "a cat"], f"pass --model hf:{llama}", "vargen convert hf")
    janus = write_hf_folder(tmp_path / "janus", "janus")
    fails(["convert", "hf", janus, "-o", str(tmp_path / "o"), "--row-separator", "lumina"],
          "--row-separator is for Chameleon")
    fails(["convert", "hf", janus, "-o", str(tmp_path / "o"), "--grid", "3x3"], "drop --grid")
    fails(["generate", "--model", f"hf:{janus}", "a cat", "--size", "32x32"], "own VQ decoder")
    fails(["generate", "--model", f"hf:{janus}", "a cat", "--method", "lpd"], "LlamaGen GPT")
    fails(["eval", "scenes", "--model", f"hf:{janus}", "--out", str(tmp_path / "s")], "Hugging Face model")
    assert not (tmp_path / "o").exists()
    # a converted folder whose Hugging Face folder moved away says so
    out = tmp_path / "pipe"
    assert main(["convert", "hf", janus, "-o", str(out)]) == 0
    (tmp_path / "janus").rename(tmp_path / "moved")
    fails(["generate", "--model", str(out), "a cat"], "refers to the Hugging Face folder", "--overwrite")


def test_log_likelihood_without_forward_train_matches_llamagen(c2i):
    """bench speed's quality proxy for protocol models without a training forward (the HF adapters):
    prefill + one teacher-forced pass gives what LlamaGen's own forward_train gives."""
    from vargen.decoding import SamplingConfig
    from vargen.eval.speed import sample_log_likelihood

    class ProtocolOnly:  # the GPT seen through the decoding protocol alone
        def __init__(self, model):
            self.model = model

        def __getattr__(self, name):
            if name == "forward_train":
                raise AttributeError(name)
            return getattr(self.model, name)

        def __call__(self, *args, **kwargs):
            return self.model(*args, **kwargs)

    tokens = torch.randint(0, c2i.vocab_size, (2, c2i.num_tokens))
    cond = torch.tensor([1, 3])
    for sampling in (SamplingConfig(cfg_scale=1.0), SamplingConfig(cfg_scale=2.5, temperature=0.9, top_k=20)):
        torch.testing.assert_close(sample_log_likelihood(ProtocolOnly(c2i), tokens, cond, sampling),
                                   sample_log_likelihood(c2i, tokens, cond, sampling), atol=1e-4, rtol=1e-5)
