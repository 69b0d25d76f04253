"""`vargen generate`: images from classes or prompts, any size, one grid."""
from __future__ import annotations

import math
import sys
import time

from ..errors import UsageError
from ..memory import parse_bytes
from .args import (add_dtype_arg, add_compile_arg, add_method_args, add_sampling_args, image_size, method_options,
                   positive_float, positive_int, sampling)


def add_generate_parser(sub) -> None:
    gen = sub.add_parser("generate", help="generate images from a class (or prompt) and save them",
                         description="Generate images and save them (several images are tiled into a grid).")
    gen.add_argument("conditions", nargs="*", metavar="PROMPT_OR_CLASS",
                     help="class id or name (c2i models) or a quoted prompt (t2i models); several give several images")
    gen.add_argument("--unconditional", action="store_true",
                     help="t2i: draw without a prompt (the text encoder's empty caption); an empty prompt is "
                          "otherwise an error")
    gen.add_argument("-o", "--output", default="outputs/sample.png",
                     help="output image path; .png, .jpg / .jpeg or .webp picks the format")
    gen.add_argument("--model", default=None,
                     help="embedded model (scenes-t2i, cifar10-c2i), pipeline folder (VarGenPipeline.save_pretrained, "
                          "vargen convert), hf:DIR (a Hugging Face Janus / Emu3 / Chameleon folder) or 'tiny-random'; "
                          "default: scenes-t2i when shipped")
    add_sampling_args(gen)
    gen.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    gen.add_argument("-n", "--num-images", type=positive_int, default=1, help="images per condition")
    add_method_args(gen)
    gen.add_argument("--tokens", type=positive_int, default=None, metavar="K",
                     help="1D-token models: stop after K tokens (any prefix decodes; fewer tokens, coarser image)")
    gen.add_argument("--size", type=image_size, default=None,
                     help="output size WIDTHxHEIGHT (e.g. 512x384), rendered by the model's LIIF decoder (or --liif)")
    gen.add_argument("--scale", type=positive_float, default=None,
                     help="output scale relative to the tokenizer's size (e.g. 2.5), rendered by LIIF")
    gen.add_argument("--liif", default=None,
                     help="LIIF token decoder folder (default: the model's own, e.g. scenes-t2i/liif)")
    gen.add_argument("--stats", default=None, help="write DecodeStats as JSON to this path")
    gen.add_argument("--max-memory", default=None, metavar="SIZE",
                     help="memory budget for decoding and rendering images, e.g. 2G (default: a quarter of the "
                          "available RAM, at most 1G); images and pixels are processed in chunks that fit, and a "
                          "request whose output alone cannot fit is refused")
    gen.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    add_compile_arg(gen)
    add_dtype_arg(gen)
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(func=cmd_generate, output_files=("output", "stats"))


def cmd_generate(args) -> int:
    import numpy as np
    import torch
    from torchvision.utils import make_grid

    from ..atomic import save_image_atomic
    from ..pipeline import TINY_RANDOM, VarGenPipeline, default_model

    if args.size and args.scale:
        raise UsageError("give --size or --scale, not both")
    if args.liif and not (args.size or args.scale):
        raise UsageError("--liif renders at another size: give --size or --scale with it")
    if args.model is None:
        args.model = default_model()
        note = " (random weights: the images are noise)" if args.model == TINY_RANDOM else ""
        print(f"vargen: using the default model {args.model!r}{note}", file=sys.stderr)
    pipe = VarGenPipeline.load(args.model, device=args.device, torch_dtype=args.dtype)
    pipe.set_progress_bar_config(disable=args.quiet)
    if args.compile:
        pipe.enable_compile(args.compile)
    start = time.perf_counter()
    if args.size or args.scale:
        from ..hf_pipeline import HFImagePipeline

        if isinstance(pipe, HFImagePipeline):
            raise UsageError("--size / --scale render through a LIIF decoder trained on a vargen tokenizer; "
                             f"{args.model} decodes with its own VQ decoder at its own size: drop them")
    height, width = args.size or (None, None)
    if args.scale:
        from ..decoders.liif import output_size

        height, width = output_size(pipe.image_size, scale=args.scale)
    if args.liif:
        pipe.load_liif(args.liif)
    conditions = [c for c in (args.conditions or [""]) for _ in range(args.num_images)]
    out = pipe(conditions, unconditional=args.unconditional, **sampling(args), seed=args.seed, height=height,
               width=width, output_type="pil", method=args.method, method_options=method_options(args),
               num_tokens=args.tokens, max_memory=args.max_memory and parse_bytes(args.max_memory))
    images = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in out.images])  # uint8
    grid = make_grid(images, nrow=max(1, math.ceil(math.sqrt(len(images))))) if len(images) > 1 else images[0]
    save_image_atomic(grid.permute(1, 2, 0).cpu().numpy(), args.output)
    stats = out.stats
    if args.stats:
        stats.extra.update(model=args.model, total_wall_s=time.perf_counter() - start)
        stats.to_json(args.stats)
    print(f"wrote {len(images)} image(s) to {args.output} ({stats.forward_passes} forward passes for "
          f"{stats.tokens} tokens, {stats.wall_s:.2f} s decoding)")
    return 0


