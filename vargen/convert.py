"""`vargen convert`: released checkpoints -> a pipeline folder every vargen command takes.

``vargen convert hf Janus-Pro-1B -o janus-pro`` writes a small folder that references the Hugging
Face folder (see :mod:`vargen.hf_pipeline`: its weights are not copied) with the settings the
family needs (token grid, row separator), so ``--model janus-pro`` needs nothing more.

``vargen convert llamagen --gpt c2i_B_256.pt --vq vq_ds16_c2i.pt -o llamagen-c2i-B`` writes a
:class:`vargen.pipeline.VarGenPipeline` folder (``model_index.json`` + safetensors), so
``vargen generate --model llamagen-c2i-B 207`` and ``VarGenPipeline.from_pretrained`` work on it.
What the files say (LlamaGen's training ``args``, else the weights) sets the config; flags fill
in what a file does not say, and a flag that contradicts the file is an error naming both values.
"""
from __future__ import annotations

import argparse
import os

from .precision import DTYPE_CHOICES, DTYPES



def add_convert_parser(sub) -> None:
    """Register ``vargen convert {llamagen,hf}`` on the CLI's sub-parsers."""
    from .models.llamagen import GPT_SIZES

    convert = sub.add_parser("convert", help="turn released checkpoints (LlamaGen .pt, Hugging Face folders) into a "
                                             "pipeline folder for --model",
                             description="Write a pipeline folder from released checkpoint files; "
                                         "see docs/checkpoints.md.")
    kinds = convert.add_subparsers(dest="source", required=True)
    lg = kinds.add_parser("llamagen", help="LlamaGen GPT + VQ (+ FLAN-T5 for t2i) checkpoints",
                          description="Settings come from the GPT file's saved args (else its weights); a flag "
                                      "fills in what the file does not say and must agree with what it does say.")
    lg.add_argument("--gpt", required=True, metavar="FILE", help="GPT checkpoint (c2i_B_256.pt, t2i_XL_stage1_256.pt, "
                                                                 "a consolidated FSDP .pth or .safetensors)")
    lg.add_argument("--vq", required=True, metavar="FILE", help="VQ tokenizer checkpoint (vq_ds16_c2i.pt, vq_ds16_t2i.pt)")
    lg.add_argument("--t5", default=None, metavar="DIR",
                    help="t2i: local FLAN-T5 folder (google/flan-t5-xl: config, weights, tokenizer) for caption features")
    lg.add_argument("--size", choices=[s for s in GPT_SIZES], default=None, help="GPT size (default: from the file)")
    lg.add_argument("--image-size", type=int, default=None, help="image size in px (default: from the file's args, else 256)")
    lg.add_argument("--downsample", type=int, choices=[8, 16], default=None,
                    help="tokenizer downsample factor (default: from the files, else 16)")
    lg.add_argument("--vocab-size", type=int, default=None, help="check: codebook size the GPT must have")
    lg.add_argument("--num-classes", type=int, default=None, help="check: c2i class count the GPT must have")
    lg.add_argument("--caption-len", type=int, default=None, help="check: t2i caption tokens (cls_token_num, 120)")
    lg.add_argument("--ema", action="store_true", help="use the files' EMA weights (train checkpoints with 'ema')")
    lg.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                    help="dtype of the stored weights (vargen loads them as fp32; bf16/fp16 halve the folder)")
    lg.add_argument("--trust-checkpoint", action="store_true",
                    help="allow pickled files to run code while loading (only for files you trust); by default "
                         "a file that needs more than tensors and plain types is refused")
    _add_out(lg)
    lg.set_defaults(func=cmd_convert)


    hf = kinds.add_parser("hf", help="a Hugging Face Janus-Pro / Emu3 / Chameleon (Lumina-mGPT, Anole) folder",
                          description="Write a pipeline folder that references DIR (its weights are not copied); "
                                      "config.json's model_type picks the family. Local files only; no code from "
                                      "the folder runs.")
    hf.add_argument("dir", metavar="DIR", help="the Hugging Face checkpoint folder (config.json, weights, processor)")
    hf.add_argument("--grid", type=_grid, default=None, metavar="HxW",
                    help="image tokens, rows x columns (Emu3: default 90x90 = 720 px; Chameleon: default from its "
                         "VQ config, Lumina-mGPT 768 px is 48x48); Janus reads it from its config")
    hf.add_argument("--row-separator", default=None, metavar="lumina|TOKEN",
                    help="Chameleon only: the token after every image row (lumina: Lumina-mGPT's <reserved08799>; "
                         "default none, as Anole)")
    hf.add_argument("--max-prompt-len", type=int, default=256, help="longest prompt in tokens (sizes the caches)")
    hf.add_argument("--dtype", choices=list(DTYPE_CHOICES), default="auto",
                    help="dtype the model loads in (auto: the checkpoint's own, e.g. bf16 for Janus-Pro)")
    _add_out(hf)
    hf.set_defaults(func=cmd_convert_hf)


def _grid(text: str) -> tuple:
    rows, _, cols = text.lower().partition("x")
    if not (rows.isdigit() and cols.isdigit() and int(rows) > 0 and int(cols) > 0):
        raise argparse.ArgumentTypeError(f"give the token grid as ROWSxCOLS (e.g. 48x48), got {text!r}")
    return int(rows), int(cols)


def _add_out(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--out", required=True, metavar="FOLDER", help="pipeline folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing pipeline folder")


def _check_out(out: str, overwrite: bool) -> None:
    """Refuse to write into a non-empty folder; ``--overwrite`` may replace a pipeline folder only (never other data)."""
    if not (os.path.isdir(out) and os.listdir(out)):
        return
    if not overwrite:
        raise ValueError(f"{out!r} exists and is not empty; pick another -o FOLDER or pass --overwrite")
    if not os.path.isfile(os.path.join(out, "model_index.json")):
        raise ValueError(f"--overwrite replaces pipeline folders only and {out!r} holds no model_index.json; "
                         "pick another -o FOLDER")


def convert_llamagen(gpt_path: str, vq_path: str, t5_dir=None, *, trust_checkpoint: bool = False,
                     prefer_ema: bool = False, downsample=None, **gpt_options):
    """A :class:`VarGenPipeline` from LlamaGen files; ``gpt_options`` go to :meth:`LlamaGen.from_llamagen`
    (``size``, ``image_size``, ``vocab_size``, ``num_classes``, ``cls_token_num``)."""
    from .models import LlamaGen
    from .models.checkpoint import CheckpointError, checkpoint_args, read_checkpoint
    from .pipeline import VarGenPipeline
    from .tokenizers import VQTokenizer

    vq = VQTokenizer.from_llamagen(vq_path, downsample=downsample, prefer_ema=prefer_ema,
                                   trust_checkpoint=trust_checkpoint)
    gpt_file = read_checkpoint(gpt_path, trust_checkpoint)
    trained_on = checkpoint_args(gpt_file).get("downsample_size")
    if trained_on is not None and trained_on != vq.downsample:
        raise CheckpointError(f"the GPT was trained on VQ-{trained_on} tokens (its args say downsample_size="
                              f"{trained_on}) but {vq_path} is a VQ-{vq.downsample} tokenizer; pair the files as released")
    # the tokenizer's factor sets the GPT's grid when the GPT file does not say it (raw state dicts)
    gpt = LlamaGen.from_llamagen(gpt_file, downsample=downsample or trained_on or vq.downsample,
                                 prefer_ema=prefer_ema, **gpt_options)
    text_encoder = tokenizer = None
    if gpt.config.model_type == "t2i":
        if t5_dir is None:
            raise ValueError(f"{gpt_path} is a text-to-image GPT: it takes FLAN-T5-XL caption features; pass --t5 DIR "
                             "(a local copy of google/flan-t5-xl), see docs/checkpoints.md")
        from .models.t5 import load_t5

        text_encoder, tokenizer = load_t5(t5_dir)
    elif t5_dir is not None:
        raise ValueError(f"--t5 is for text-to-image GPTs and {gpt_path} is class-conditional; drop --t5")
    return VarGenPipeline(gpt=gpt, vq=vq, text_encoder=text_encoder, tokenizer=tokenizer)


def _remove_old(out: str) -> None:
    if os.path.isdir(out):  # checked by _check_out: an old pipeline; its stale components must not survive
        import shutil

        shutil.rmtree(out)


def _save(pipe, out: str, dtype: str) -> None:
    _remove_old(out)
    from .loading import quiet_loading

    with quiet_loading():
        pipe.to(DTYPES[dtype]).save_pretrained(out)


def cmd_convert(args) -> int:
    _check_out(args.out, args.overwrite)
    pipe = convert_llamagen(args.gpt, args.vq, args.t5, trust_checkpoint=args.trust_checkpoint, prefer_ema=args.ema,
                            downsample=args.downsample, size=args.size, image_size=args.image_size,
                            vocab_size=args.vocab_size, num_classes=args.num_classes, cls_token_num=args.caption_len)
    _save(pipe, args.out, args.dtype)
    gpt = pipe.gpt
    rows, cols = gpt.grid
    what = f"{gpt.config.num_classes} classes" if gpt.config.model_type == "c2i" else "text (FLAN-T5 captions)"
    print(f"wrote {args.out}: LlamaGen {gpt.config.model_type} ({sum(p.numel() for p in gpt.parameters()) / 1e6:.1f}M "
          f"params, {what}), {rows} x {cols} tokens -> {rows * pipe.vq.downsample} x {cols * pipe.vq.downsample} px, "
          f"{args.dtype}. Try: vargen generate --model {args.out} "
          f"{'0' if gpt.config.model_type == 'c2i' else repr('a photo of a cat')} --method sjd")
    return 0


def cmd_convert_hf(args) -> int:
    from .hf_pipeline import HFImagePipeline

    _check_out(args.out, args.overwrite)
    if args.max_prompt_len < 1:
        raise ValueError(f"--max-prompt-len must be positive, got {args.max_prompt_len}")
    pipe = HFImagePipeline.from_hf(args.dir, grid=args.grid, row_separator=args.row_separator,
                                   max_prompt_len=args.max_prompt_len, dtype=args.dtype)
    _remove_old(args.out)
    pipe.save_pretrained(args.out)
    model = pipe.gpt
    rows, cols = model.grid
    if model.has_image_decoder:
        then = f"Try: vargen generate --model {args.out} 'a photo of a cat' --method sjd"
    else:
        then = ("transformers has no image decoder for it: tokens only, from Python (docs/checkpoints.md). Try: "
                f"vargen bench speed --model {args.out} --methods sjd")
    print(f"wrote {args.out}: {model.family} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"{rows} x {cols} image tokens) referencing {os.path.abspath(args.dir)} (not copied: keep it there). {then}")
    return 0
