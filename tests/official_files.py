"""Checkpoint files in the formats LlamaGen's own scripts write, with tiny random weights.

LlamaGen's train scripts save ``{"model", "optimizer", "steps", "args": argparse.Namespace}``;
its FSDP scripts save a raw state dict (``consolidated.pth``); released tokenizers hold
``{"model": ...}``. The tests write such files themselves since no weights can be downloaded.
"""
import argparse
import os

import torch

from vargen.models import LlamaGen
from vargen.tokenizers import VQTokenizer


class Payload:
    """Unpickling this runs ``touch marker``: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def llamagen_args(**kw) -> argparse.Namespace:
    """The training args LlamaGen pickles into its checkpoints (c2i defaults of ``train_c2i.py``)."""
    args = dict(code_path="/data/imagenet_code", cloud_save_path="/cloud", no_local_save=False, gpt_model="GPT-B",
                gpt_ckpt=None, gpt_type="c2i", vocab_size=16384, ema=False, cls_token_num=1, dropout_p=0.1,
                token_dropout_p=0.1, drop_path_rate=0.0, no_compile=False, results_dir="results",
                dataset="imagenet_code", image_size=256, downsample_size=16, num_classes=1000, epochs=300, lr=1e-4,
                weight_decay=5e-2, beta1=0.9, beta2=0.95, max_grad_norm=1.0, global_batch_size=256, global_seed=0,
                num_workers=24, log_every=100, ckpt_every=5000, gradient_accumulation_steps=1,
                mixed_precision="bf16", rank=0, world_size=8, gpu=0, dist_url="env://", distributed=True,
                dist_backend="nccl")
    return argparse.Namespace(**{**args, **kw})


def tiny_gpt(model_type="c2i", image_size=256, downsample=16, vocab=64, num_classes=1000, cls_token_num=120,
             caption_dim=32, size="GPT-tiny", seed=0) -> LlamaGen:
    torch.manual_seed(seed)
    extra = dict(num_classes=num_classes) if model_type == "c2i" else dict(cls_token_num=cls_token_num,
                                                                        caption_dim=caption_dim)
    gpt = LlamaGen.from_size(size, model_type=model_type, vocab_size=vocab,
                             block_size=(image_size // downsample) ** 2, **extra)
    torch.nn.init.normal_(gpt.output.weight, 0.0, 0.5)  # LlamaGen zero-inits the head
    return gpt.eval()


def write_gpt(path, gpt: LlamaGen, args=None, extra=None) -> str:
    """A LlamaGen train-script checkpoint (``args`` given) or a raw FSDP state dict (``args=None``)."""
    state = gpt.state_dict()
    if args is None:
        torch.save({**state, **(extra or {})}, path)
        return str(path)
    optimizer = torch.optim.AdamW(gpt.parameters(), lr=args.lr, betas=(args.beta1, args.beta2))
    torch.save({"model": state, "optimizer": optimizer.state_dict(), "steps": 5000, "args": args, **(extra or {})},
               path)
    return str(path)


def tiny_vq(codebook=64, downsample=16, seed=0) -> VQTokenizer:
    torch.manual_seed(seed)
    mult = (1, 1, 2, 2, 4) if downsample == 16 else (1, 2, 2, 4)
    return VQTokenizer(codebook_size=codebook, ch=32, ch_mult=mult, z_channels=32).eval()


def write_vq(path, vq: VQTokenizer, extra=None) -> str:
    torch.save({"model": vq.state_dict(), **(extra or {})}, path)
    return str(path)


def tiny_t5(folder, words, d_model=32) -> str:
    """A random FLAN-T5-shaped encoder + a word-level T5-style tokenizer (``<pad>`` 0, ``</s>`` 1 appended,
    ``<unk>`` 2), saved as ``save_pretrained`` writes them: built offline (no sentencepiece model needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                            model_max_length=512).save_pretrained(folder)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    T5EncoderModel(config).eval().save_pretrained(folder)
    return str(folder)
