"""The ``vargen`` command line."""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback

from .atomic import image_format
from .errors import UsageError, VargenError, finite, load_local, shorten, writable_file, writable_folder
from .memory import parse_bytes


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be > 0 and finite, got {text}")
    return value


def _image_size(text: str) -> tuple:
    """``"512x384"`` (width x height, as image tools write it) -> ``(height, width)``."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 512x384, got {text!r}")
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return h, w


class _OldSpellingWarns(argparse.Action):
    """One spelling per option across commands: the first option string is it; the others still work
    and say so."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string != self.option_strings[0]:
            print(f"vargen: warning: {option_string} is an old spelling of {self.option_strings[0]}; use that",
                  file=sys.stderr)
        setattr(namespace, self.dest, values)


def _method_names() -> list:
    from .decoding.methods import METHODS

    return sorted(METHODS)


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="sampling temperature (default 1; 0 = greedy)")
    parser.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (default 0 = all)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus mass to keep (default 1 = all)")


def _add_lantern_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lantern-delta", type=float, default=None, help="LANTERN pooled-mass budget (default 0.1)")
    parser.add_argument("--lantern-lambda", type=float, default=None, help="LANTERN++ lambda mode instead of delta")
    parser.add_argument("--lantern-k", type=_positive_int, default=None, help="LANTERN neighbours per code (1000)")


def _add_method_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default="ar", help="decoding method: " + ", ".join(_method_names()))
    parser.add_argument("--coupling", default="none", help="with --method sjd: none, maximal or gumbel redraws")
    parser.add_argument("--relax", default="none", help="with --method sjd: none, lantern or gsd acceptance")
    _add_decode_option_flags(parser)


def _add_decode_option_flags(parser: argparse.ArgumentParser) -> None:
    """Every method's own options (routed by :func:`vargen.decoding.options.route_options`: each reaches every
    selected method that takes it, and one no selected method takes is refused)."""
    parser.add_argument("--window", type=_positive_int, default=None,
                        help="drafts per verify pass (sjd, jacobi, gsd: default 16) and row lead (zipar: default 8), "
                             "for every selected method that has a window")
    parser.add_argument("--init", default=None,
                        help="draft initialisation (sjd, jacobi): random, left, above (up), left-dist (sample)")
    parser.add_argument("--zipar-window", type=_positive_int, default=None,
                        help="the zipar methods' row lead only (beside --window for the others)")
    parser.add_argument("--zipar-min-window", "--min-window", dest="zipar_min_window", type=_positive_int,
                        default=None, action=_OldSpellingWarns,
                        help="zipar-adaptive: row lead at which a row starts early (default window // 2)")
    parser.add_argument("--lpd", default=None, metavar="PATH",
                        help="lpd: LPD model folder (default: the model's own lpd/, e.g. scenes-t2i/lpd)")
    parser.add_argument("--lpd-steps", type=_positive_int, default=None, help="lpd: forward passes (default 20)")
    parser.add_argument("--nar", default=None, metavar="PATH",
                        help="nar: NAR model folder (default: the model's own nar/, e.g. scenes-t2i/nar)")
    parser.add_argument("--eagle", default=None, metavar="PATH",
                        help="eagle: EAGLE drafter folder (default: the model's own eagle/, e.g. scenes-t2i/eagle)")
    parser.add_argument("--eagle-tree", default=None,
                        help="eagle: draft tree: dynamic (EAGLE-2, default), chain or mc_sim_25 (static)")
    parser.add_argument("--eagle-depth", type=_positive_int, default=None,
                        help="eagle: draft depth (dynamic / chain, default 5)")
    parser.add_argument("--eagle-topk", type=_positive_int, default=None,
                        help="eagle: dynamic tree: children per node and nodes expanded per depth (default 8)")
    parser.add_argument("--eagle-tokens", type=_positive_int, default=None,
                        help="eagle: dynamic tree: draft nodes verified per pass (default 48)")
    parser.add_argument("--mulo", default=None, metavar="PATH",
                        help="mulo: MuLo drafter + up-sampler folder (default: the model's own mulo/)")
    parser.add_argument("--mulo-radius", type=int, default=None, help="mulo: re-verify radius after round 1 (1)")
    parser.add_argument("--mulo-expand", type=int, default=None, help="mulo: radius growth per round (1)")
    parser.add_argument("--mulo-rounds", type=_positive_int, default=None,
                        help="mulo: verify rounds at most (default: until nothing is pending)")
    parser.add_argument("--mulo-finish", default=None, choices=["accept", "ar"],
                        help="mulo: cells still pending at the round limit: accept them or plain AR (accept)")
    _add_lantern_args(parser)


def _add_compile_arg(parser: argparse.ArgumentParser) -> None:
    from .models.compiled import COMPILE_MODES

    parser.add_argument("--compile", nargs="?", const="reduce-overhead", default=None, choices=COMPILE_MODES,
                        metavar="MODE", help="decode steps under torch.compile (default mode reduce-overhead: "
                                             "CUDA graphs on a GPU); the first call per shape compiles")


def _method_options(args) -> dict:
    """The options of ``--method`` from its flags (refusing a flag the method does not take)."""
    from .decoding.options import route_options

    return route_options([args.method], vars(args))[args.method]


SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}


def _sampling(args) -> dict:
    given = {k: getattr(args, k) for k in SAMPLING_DEFAULTS}
    return {"cfg_scale": args.cfg, **{k: SAMPLING_DEFAULTS[k] if v is None else v for k, v in given.items()}}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vargen", description="Fast autoregressive image generation.")
    sub = parser.add_subparsers(dest="command", required=True)

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
    _add_sampling_args(gen)
    gen.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    gen.add_argument("-n", "--num-images", type=_positive_int, default=1, help="images per condition")
    _add_method_args(gen)
    gen.add_argument("--tokens", type=_positive_int, default=None, metavar="K",
                     help="1D-token models: stop after K tokens (any prefix decodes; fewer tokens, coarser image)")
    gen.add_argument("--size", type=_image_size, default=None,
                     help="output size WIDTHxHEIGHT (e.g. 512x384), rendered by the model's LIIF decoder (or --liif)")
    gen.add_argument("--scale", type=_positive_float, default=None,
                     help="output scale relative to the tokenizer's size (e.g. 2.5), rendered by LIIF")
    gen.add_argument("--liif", default=None,
                     help="LIIF token decoder folder (default: the model's own, e.g. scenes-t2i/liif)")
    gen.add_argument("--stats", default=None, help="write DecodeStats as JSON to this path")
    gen.add_argument("--max-memory", default=None, metavar="SIZE",
                     help="memory budget for decoding and rendering images, e.g. 2G (default: a quarter of the "
                          "available RAM, at most 1G); images and pixels are processed in chunks that fit, and a "
                          "request whose output alone cannot fit is refused")
    gen.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    _add_compile_arg(gen)
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(func=cmd_generate, output_files=("output", "stats"))

    sample = sub.add_parser("sample", help="draw N numbered PNGs for FID / benchmarks (sharded, resumable)",
                            description="Draw images 000000.png .. N-1 into a folder. Image i has a fixed condition "
                                        "and seed (seed + i); `accelerate launch` splits the indices across "
                                        "processes; a rerun skips finished images and draws only the missing ones.")
    sample.add_argument("--model", default=None, help="embedded model, pipeline folder, hf:DIR (Hugging Face folder) or tiny-random")
    sample.add_argument("-n", "--n", type=_positive_int, required=True, help="number of images (e.g. 50000)")
    sample.add_argument("--out", required=True, help="output folder")
    sample.add_argument("--classes", default="balanced", choices=["balanced", "random"],
                        help="c2i: class i %% C for image i, or seeded random classes")
    sample.add_argument("--prompts", default=None,
                        help="t2i: prompt file (.txt one per line, or .jsonl with prompt/caption); "
                             "default: held-out scene captions")
    sample.add_argument("--scene-seed", type=int, default=999, help="t2i default prompts: scene seed")
    sample.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    sample.add_argument("--batch-size", type=_positive_int, default=16, help="images per decoding call")
    _add_method_args(sample)
    _add_sampling_args(sample)
    sample.add_argument("--npz", action="store_true", help="also pack samples_N.npz (arr_0, ADM / LlamaGen format)")
    sample.add_argument("--device", default=None, help="torch device (default: the accelerate process's device)")
    sample.add_argument("--quiet", action="store_true", help="no progress bar")
    sample.set_defaults(func=cmd_sample, output_dirs=("out",))

    train = sub.add_parser("train", help="train a tokenizer, an AR generator or the FD-vargen classifier from a JSON "
                                         "recipe config",
                           description="Train with a recipe config (configs/*.json); reruns resume from OUT/state.")
    train.add_argument("what", choices=["tokenizer", "ar", "classifier", "liif", "flex1d", "lpd", "nar", "eagle", "mulo"],
                       help="what to train")
    train.add_argument("--config", required=True, help="recipe config (JSON), e.g. configs/scenes_vq.json")
    train.add_argument("--out", default=None, help="output folder (default runs/<config name>)")
    train.add_argument("--steps", type=_positive_int, default=None, help="override the config's step count")
    train.set_defaults(func=cmd_train, output_dirs=("out",))

    evaluate = sub.add_parser("eval", help="evaluate generated images")
    eval_sub = evaluate.add_subparsers(dest="what", required=True)
    scenes = eval_sub.add_parser("scenes", help="caption following of a scene model on held-out scene prompts",
                                 description="Generate from N held-out scene captions and check colours, counts "
                                             "and positions against the exact scene metadata.")
    scenes.add_argument("--model", default=None, help="t2i model trained on scenes (default: the default model)")
    scenes.add_argument("-n", "--n", type=_positive_int, default=100, help="number of scene prompts")
    scenes.add_argument("--seed", type=int, default=999, help="scene seed (training used 0 and 1)")
    _add_sampling_args(scenes)
    scenes.add_argument("--out", default="outputs/eval_scenes", help="folder for scores.json and grid.png")
    scenes.add_argument("--device", default="cpu", help="torch device")
    scenes.set_defaults(func=cmd_eval_scenes, output_dirs=("out",))

    sr = eval_sub.add_parser("sr", help="arbitrary-scale decoding: LIIF against bicubic, Y-PSNR per scale",
                             description="Held-out scenes rendered exactly at every target size: the LIIF token "
                                         "decoder on the tokens of the low-resolution render, against the "
                                         "tokenizer's decode + bicubic and bicubic from the exact render "
                                         "(PSNR on Y, shave = ceil(scale), as LIIF reports).")
    sr.add_argument("--liif", required=True,
                    help="LIIF token decoder folder (with --vq), or an image-input LIIF: an official-format "
                         "checkpoint (.pth, or a folder holding liif.pth from a `vargen train liif` SR config)")
    sr.add_argument("--vq", default=None, help="the token decoder's tokenizer folder, e.g. vargen/weights/scenes-t2i/vq")
    sr.add_argument("--benchmark", default=None, metavar="ROOT",
                    help="also score Set5 / Set14 under ROOT (e.g. ../shared/data/sr; image-input LIIF only)")
    sr.add_argument("--scales", default="2,3,4,2.5", help="comma-separated scales")
    sr.add_argument("--base", type=_positive_int, default=None,
                    help="low-resolution scene size (default 128 for a token decoder, 32 for an image-input LIIF)")
    sr.add_argument("--n-scenes", type=_positive_int, default=32, help="held-out scenes")
    sr.add_argument("--seed", type=int, default=10_000, help="scene seed")
    sr.add_argument("--json", default=None, help="write the table as JSON here")
    sr.add_argument("--device", default="cpu", help="torch device")
    sr.set_defaults(func=cmd_eval_sr, output_files=("json",))

    flex = eval_sub.add_parser("flex1d", help="1D flexible tokenizer: reconstruction PSNR against token count",
                               description="Held-out scenes encoded with every prefix length of the 1D tokenizer, "
                                           "next to the 2D VQ tokenizer on the same scenes.")
    flex.add_argument("--tokenizer", required=True, help="Flex1DTokenizer folder (from `vargen train flex1d`)")
    flex.add_argument("--vq", default=None, help="2D VQ tokenizer to compare with, e.g. vargen/weights/scenes-t2i/vq")
    flex.add_argument("--vq-resolution", type=_positive_int, nargs="+", default=[128],
                      help="resolutions to run the 2D VQ at")
    flex.add_argument("-n", "--n", type=_positive_int, default=64, help="held-out scenes")
    flex.add_argument("--seed", type=int, default=10_000, help="scene seed (training uses 0-2)")
    flex.add_argument("--lengths", type=_positive_int, nargs="+", default=None,
                      help="prefix lengths (default: powers of two up to K)")
    flex.add_argument("--out", default="outputs/flex1d", help="folder for psnr_vs_tokens.json/.png and recon.png")
    flex.add_argument("--device", default="cpu", help="torch device")
    flex.set_defaults(func=cmd_eval_flex1d, output_dirs=("out",))

    geneval = eval_sub.add_parser("geneval", help="draw GenEval's prompts in the official layout (and score them)",
                                  description="Write OUT/<index:05d>/metadata.jsonl and samples/<n:04d>.png for each "
                                              "prompt of GenEval's evaluation_metadata.jsonl, exactly as the official "
                                              "evaluator reads them. Sample n of prompt i uses seed + i * K + n "
                                              "(K = --n-samples); a rerun draws only the missing images.")
    geneval.add_argument("--metadata", required=True,
                         help="GenEval's prompts/evaluation_metadata.jsonl (e.g. ../shared/data/geneval/...)")
    geneval.add_argument("--out", required=True, help="output folder (the evaluator's image folder)")
    geneval.add_argument("--model", default=None, help="text-to-image model: embedded model, pipeline folder or hf:DIR")
    geneval.add_argument("--limit", type=_positive_int, default=None, help="only the first N prompts")
    geneval.add_argument("--n-samples", type=_positive_int, default=4, help="images per prompt (GenEval: 4)")
    geneval.add_argument("--seed", type=int, default=0, help="sample n of prompt i uses seed + i * n_samples + n")
    geneval.add_argument("--batch-size", type=_positive_int, default=16, help="images per decoding call")
    geneval.add_argument("--grid", action="store_true", help="also write each prompt's grid.png")
    _add_method_args(geneval)
    _add_sampling_args(geneval)
    geneval.add_argument("--score", action="store_true",
                         help="then run GenEval's official evaluator (needs --detector, --clip, --geneval-repo, "
                              "mmdet 2.x, open_clip, clip_benchmark, pandas and a CUDA GPU)")
    geneval.add_argument("--detector", default=None,
                         help="folder holding mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth "
                              "(geneval's evaluation/download_models.sh)")
    geneval.add_argument("--clip", default=None, help="open_clip ViT-L-14 'openai' weights file (or 'openai')")
    geneval.add_argument("--geneval-repo", default=None, help="a checkout of djghosh13/geneval")
    geneval.add_argument("--results", default=None, help="evaluator output (default OUT/results.jsonl)")
    geneval.add_argument("--device", default="cpu", help="torch device")
    geneval.add_argument("--quiet", action="store_true", help="no progress bar")
    geneval.set_defaults(func=cmd_eval_geneval, output_dirs=("out",))

    fid = eval_sub.add_parser("fid", help="FID (clean-fid), precision/recall and IS of an image folder",
                              description="FID of GEN_DIR against REF (an image folder or a .npz from `vargen eval "
                                          "fid-stats`) through clean-fid. The default extractor is clean-fid's "
                                          "Inception, read from --inception (never downloaded); `--extractor "
                                          "fd-vargen` uses vargen's CIFAR-10 classifier instead (FD-vargen: not "
                                          "comparable with published FID).")
    fid.add_argument("gen_dir", help="folder of generated images")
    fid.add_argument("ref", help="reference image folder or statistics .npz")
    _add_extractor_args(fid)
    fid.add_argument("--json", default=None, help="write the result as JSON here")
    fid.set_defaults(func=cmd_eval_fid, output_files=("json",))

    stats = eval_sub.add_parser("fid-stats", help="reference statistics (.npz) of a folder or a vargen dataset",
                                description="Compute mu, sigma and features of SOURCE with the chosen extractor and "
                                            "cache them as .npz for `vargen eval fid`.")
    stats.add_argument("source", help='an image folder, or a dataset spec as JSON, e.g. '
                                      '\'{"name": "cifar10", "path": "../shared/data/cifar10", "split": "test"}\'')
    stats.add_argument("--out", required=True, help="statistics file to write (.npz)")
    _add_extractor_args(stats)
    stats.set_defaults(func=cmd_eval_fid_stats, output_files=("out",))

    bench = sub.add_parser("bench", help="benchmarks: decoding speed next to quality, method against AR")
    bench_sub = bench.add_subparsers(dest="what", required=True)
    speed = bench_sub.add_parser("speed", help="forward passes, latency and quality proxies of decoding methods",
                                 description="Decode the same conditions and seeds with every method and compare "
                                             "with plain AR in the same run.")
    _add_bench_args(speed, methods="ar,sjd,sjd+coupling", n=32, batch_size=8)
    speed.add_argument("--device", default="cpu", help="torch device")
    _add_compile_arg(speed)
    speed.add_argument("--json", default=None, help="write the report as JSON here")
    speed.add_argument("--plot", default=None, help="write accepted-length histograms and acceptance maps (PNG)")
    latency = speed.add_argument_group(
        "latency table", "with --sizes: time every method's steps on random-weight LlamaGen GPTs of these sizes "
                         "against AR and the memory-bandwidth floor; SJD-family step counts come from --model's "
                         "trained step compression (or --compression-json)")
    latency.add_argument("--sizes", default=None, help="comma-separated GPT sizes, e.g. GPT-B,GPT-XL")
    latency.add_argument("--tokens", default="256,1024", help="image tokens per sample (square grids)")
    latency.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes")
    latency.add_argument("--dtype", default=None, help="weights dtype: bf16 (default on cuda), fp16, fp32 (cpu)")
    latency.add_argument("--reps", type=_positive_int, default=2, help="timed decodes per cell (median)")
    latency.add_argument("--compression-json", default=None,
                         help="step compression from a previous `bench speed --json` instead of measuring it")
    speed.set_defaults(func=cmd_bench_speed, output_files=("json", "plot"))

    report = bench_sub.add_parser("report", help="sample every method on the same seeds; speed next to quality",
                                  description="Draw the same N images with every method (resumable PNG folders "
                                              "under OUT/<method>) and write one table: forward passes, step "
                                              "compression, latency, speedup, FD-vargen against AR with its noise "
                                              "floor, and the exact scene score for scene prompts, each with a "
                                              "95% bootstrap interval (report.md, report.json, report.png).")
    _add_bench_args(report, methods="ar,sjd,sjd+coupling,sjd+lantern,gsd,zipar", n=256, batch_size=16)
    report.add_argument("--scene-seed", type=int, default=999, help="t2i: held-out scene prompts' seed")
    report.add_argument("--extractor", default=None,
                        help="FD-vargen classifier folder (default: the shipped fd-vargen-cifar10)")
    report.add_argument("--reference", default=None,
                        help="also FD to real data: an image folder or a .npz from `vargen eval fid-stats` made "
                             "with the same extractor")
    report.add_argument("--bootstrap", type=_positive_int, default=200, help="bootstrap rounds for the intervals")
    report.add_argument("--out", default="outputs/report", help="folder for the sample sets and the report")
    report.add_argument("--device", default="cpu", help="torch device")
    report.add_argument("--quiet", action="store_true", help="no progress bars")
    report.set_defaults(func=cmd_bench_report, output_dirs=("out",))

    export = sub.add_parser("export", help="package trained runs as an embedded model (fp16, samples, model card)")
    export.add_argument("spec", help="export spec (JSON): name, vq_run, ar_run, out, prompts, eval_data")
    export.add_argument("--out", default=None, help="override the spec's output folder")
    export.set_defaults(func=cmd_export, output_dirs=("out",))

    from .convert import add_convert_parser

    add_convert_parser(sub)
    return parser


def _add_extractor_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--extractor", default="inception",
                        help="inception (clean-fid's, needs --inception), fd-vargen (the shipped CIFAR-10 "
                             "classifier) or a classifier folder from `vargen train classifier`")
    parser.add_argument("--inception", default=None,
                        help="local inception-2015-12-05.pt (clean-fid's TorchScript Inception) or its folder")
    parser.add_argument("--mode", default="clean", help="clean-fid mode: clean, legacy_tensorflow, legacy_pytorch")
    parser.add_argument("--batch-size", type=_positive_int, default=64, help="images per feature batch")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")


def _extractor(args):
    """``None`` (clean-fid's Inception) or the FD-vargen classifier named by ``--extractor``."""
    if args.extractor == "inception":
        return None
    from .eval.classifier import load_fd_vargen

    return load_fd_vargen(None if args.extractor == "fd-vargen" else args.extractor)


def cmd_eval_fid(args) -> int:
    import json

    from .atomic import write_atomic
    from .eval.fid import compute_fid

    result = compute_fid(args.gen_dir, args.ref, mode=args.mode, extractor=_extractor(args),
                         inception_path=args.inception, batch_size=args.batch_size, device=args.device)
    d = result.as_dict()
    label = "FID" if d["comparable_with_published"] else f"FD ({d['extractor']}; not comparable with published FID)"
    print(f"{label}: {d['fid']:.4f}  ({d['n_gen']} generated vs {d['n_ref']} reference images, mode {d['mode']})")
    for key in ("precision", "recall", "is_mean"):
        if d[key] is not None:
            extra = f" ± {d['is_std']:.3f}" if key == "is_mean" else ""
            print(f"{key.replace('is_mean', 'IS')}: {d[key]:.4f}{extra}")
    if args.json:
        write_atomic(args.json, json.dumps(d, indent=2))
        print(f"wrote {args.json}")
    return 0


def cmd_eval_fid_stats(args) -> int:
    import json

    from .eval.fid import reference_stats

    source = args.source
    if source.lstrip().startswith("{"):
        from .data.registry import build_dataset

        source = build_dataset([json.loads(source)])
    stats = reference_stats(source, args.out, extractor=_extractor(args), mode=args.mode,
                            inception_path=args.inception, batch_size=args.batch_size, device=args.device)
    print(f"wrote {args.out}: {int(stats['n'])} images, {stats['mu'].shape[0]}-d features of "
          f"{stats['extractor_name']} (mode {stats['mode']})")
    return 0


def cmd_eval_scenes(args) -> int:
    import json

    import torch
    from torchvision.utils import save_image

    from .eval.scenes import colour_fidelity, scene_following, tokenizer_ceiling
    from .hf_pipeline import HFImagePipeline
    from .pipeline import VarGenPipeline

    pipe = VarGenPipeline.load(args.model, device=args.device)
    if isinstance(pipe, HFImagePipeline):
        raise ValueError("scene evaluation scores models trained on vargen's rendered scenes against their tokenizer; "
                         f"{args.model} is a Hugging Face model: use `vargen eval geneval` or `vargen bench report`")
    if not pipe.takes_text:
        raise ValueError("scene evaluation needs a text-to-image model (e.g. scenes-t2i); "
                         f"{args.model or 'the default model'} is class-conditional")
    result = scene_following(pipe, n=args.n, seed=args.seed, **_sampling(args))
    os.makedirs(args.out, exist_ok=True)
    images = torch.from_numpy(result.pop("images")).permute(0, 3, 1, 2).float() / 255
    save_image(images, os.path.join(args.out, "grid.png"), nrow=10, padding=2)
    result.update(model=args.model, n_prompts=args.n, scene_seed=args.seed, sampling=_sampling(args),
                  tokenizer_ceiling=tokenizer_ceiling(pipe.vq, n=args.n, seed=args.seed),
                  tokenizer_colours=colour_fidelity(pipe.vq))
    with open(os.path.join(args.out, "scores.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"{'task':<14} {'n':>4} {'accuracy':>9} {'exact':>6} {'count':>7} {'colour':>7} {'position':>9}")
    for task, r in result["by_task"].items():
        cells = [f"{r[k]:.2f}" if k in r else "-" for k in ("count", "color", "position")]
        print(f"{task:<14} {r['n']:>4} {r['accuracy']:>9.2f} {r['exact']:>6.2f} {cells[0]:>7} {cells[1]:>7} "
              f"{cells[2]:>9}")
    cap = result["tokenizer_ceiling"]
    for name, r in (("overall", result), ("tokenizer cap", cap)):
        print(f"{name:<14} {r['n']:>4} {r['overall']:>9.2f} {r['overall_exact']:>6.2f}  (mean of the task accuracies; "
              f"images fully correct {r['all']:.2f}, {r['extra']:.1f} unnamed objects per image)")
    print("accuracy is GenEval's verdict; exact also wants no object beyond those the prompt names")
    colours = result["tokenizer_colours"]
    print(f"tokenizer colours: {colours['colours_kept']} of {len(colours['by_colour'])} kept, "
          f"{colours['objects_kept']:.0%} of single objects decoded in their colour (lost: "
          + (", ".join(c for c, v in colours["by_colour"].items() if v < 0.5) or "none") + ")")
    print(f"wrote {args.out}/scores.json and {args.out}/grid.png")
    return 0


def _add_bench_args(parser: argparse.ArgumentParser, methods: str, n: int, batch_size: int) -> None:
    """The flags every benchmark shares: model, methods and their options, images and seeds, sampling."""
    parser.add_argument("--model", default=None, help="embedded model, pipeline folder, hf:DIR (Hugging Face folder) or tiny-random")
    parser.add_argument("--methods", default=methods,
                        help="comma-separated methods (ar is always run): " + ", ".join(_method_names()))
    parser.add_argument("-n", "--n", type=_positive_int, default=n, help="images per method")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i for every method")
    parser.add_argument("--batch-size", type=_positive_int, default=batch_size, help="images per decoding call")
    _add_decode_option_flags(parser)
    _add_sampling_args(parser)


def _bench_methods(args) -> tuple:
    """``(methods, options per method)`` from ``--methods`` and the option flags (each routed to every method
    that takes it)."""
    from .decoding.options import route_options

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    return methods, route_options(methods, vars(args))


def cmd_eval_sr(args) -> int:
    import json

    from .atomic import write_atomic
    from .decoders import LIIF, LIIFTokenDecoder
    from .eval.sr import compare_benchmark, compare_scales, format_table, scale_consistency, upsamplers
    from .tokenizers import VQTokenizer

    scales = [float(v) for v in args.scales.split(",")]
    if any(v <= 0 for v in scales):
        raise ValueError(f"scales must be > 0, got {args.scales}")
    if args.vq:
        if args.benchmark:
            raise ValueError("--benchmark scores an image-input LIIF; a token decoder (--vq) only sees its tokens")
        methods = upsamplers(LIIFTokenDecoder.from_pretrained(args.liif).to(args.device),
                             load_local(VQTokenizer, args.vq, "the tokenizer (--vq)").eval().to(args.device))
    elif os.path.isdir(args.liif) and not os.path.exists(os.path.join(args.liif, LIIF.CHECKPOINT)):
        raise ValueError(f"{args.liif} holds no {LIIF.CHECKPOINT}: for a LIIF token decoder pass its tokenizer "
                         "with --vq")
    else:
        methods = upsamplers(LIIF.from_liif(args.liif).to(args.device))
    base = args.base or (128 if args.vq else 32)
    table = compare_scales(methods, base=base, scales=scales, n_scenes=args.n_scenes,
                           seed=args.seed, device=args.device)
    print(f"held-out scenes, {base} px input:\n{format_table(table)}")
    if args.benchmark:
        for name, rows in compare_benchmark(methods, args.benchmark, scales=scales, device=args.device).items():
            print(f"{name}:\n{format_table(rows)}")
            table[name] = rows
    consistency = scale_consistency(methods, base=base, scale=4, n_scenes=args.n_scenes, seed=args.seed,
                                    device=args.device)
    table["consistency_x4_to_x1_db"] = consistency
    print("scale consistency (x4 output area-downsampled vs x1 output, Y-PSNR dB): "
          + ", ".join(f"{k} {v:.2f}" for k, v in consistency.items()))
    if args.json:
        write_atomic(args.json, json.dumps(table, indent=2))
        print(f"wrote {args.json}")
    return 0


def cmd_eval_flex1d(args) -> int:
    from .eval.flex1d import evaluate, format_table

    table = evaluate(args.tokenizer, args.vq, args.n, args.seed, args.lengths, args.vq_resolution, args.out,
                     args.device)
    print(format_table(table))
    print(f"wrote {args.out}/psnr_vs_tokens.json, psnr_vs_tokens.png, recon.png")
    return 0


def cmd_eval_geneval(args) -> int:
    from .eval.geneval import (GenEvalUnavailable, check_layout, format_summary, read_metadata, score_geneval,
                               write_geneval)
    from .pipeline import VarGenPipeline

    metadata = read_metadata(args.metadata)  # a wrong path fails before a model is loaded
    pipe = VarGenPipeline.load(args.model, device=args.device)
    if not pipe.takes_text:
        raise ValueError("GenEval needs a text-to-image model (e.g. scenes-t2i); "
                         f"{args.model or 'the default model'} is class-conditional")
    done = write_geneval(pipe, metadata, args.out, n_samples=args.n_samples, seed=args.seed,
                         batch_size=args.batch_size, limit=args.limit, progress=not args.quiet, grid=args.grid,
                         method=args.method, method_options=_method_options(args), **_sampling(args))
    prompts, images = check_layout(args.out, metadata, n_samples=args.n_samples, limit=args.limit)
    print(f"drew {done['drawn']} images, {done['skipped']} already there ({done['wall_s']:.1f} s); "
          f"{args.out}: {prompts} prompts, {images} images in GenEval's layout")
    if args.score:
        try:
            summary = score_geneval(args.out, args.detector, args.clip, args.geneval_repo, outfile=args.results)
        except GenEvalUnavailable as err:  # what is missing, and the official commands to run elsewhere
            print(f"vargen: error: {err}", file=sys.stderr)
            return 2
        print(format_summary(summary))
    return 0


def cmd_bench_report(args) -> int:
    from .eval.report import bench_report, format_report, write_report
    from .pipeline import VarGenPipeline

    pipe = VarGenPipeline.load(args.model, device=args.device)
    pipe.check_decodes_images()  # the report scores images
    methods, options = _bench_methods(args)
    extractor = None
    if args.extractor:
        from .eval.classifier import load_fd_vargen

        extractor = load_fd_vargen(args.extractor, device=args.device)
    report = bench_report(pipe, methods, args.n, args.out, seed=args.seed, batch_size=args.batch_size,
                          sampling=_sampling(args), method_options=options, extractor=extractor,
                          scene_seed=args.scene_seed, model_name=args.model, reference=args.reference,
                          bootstrap=args.bootstrap,
                          progress=not args.quiet)
    print(f"model {report['model']}, {report['device']}, n={args.n}, seed={args.seed}, batch {args.batch_size}, "
          f"sampling {report['sampling']}")
    print(format_report(report))
    paths = write_report(report, args.out)
    print("wrote " + ", ".join(paths.values()))
    return 0


def _int_list(text: str, flag: str) -> list:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{flag} takes positive integers, got {text!r}")
    return values


def cmd_bench_latency(args) -> int:
    import json

    from .atomic import write_atomic
    from .eval.latency import bench_latency, depends_on_acceptance, format_latency_table
    from .eval.speed import bench_speed
    from .models.llamagen import GPT_SIZES

    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in GPT_SIZES]
    if unknown:
        raise ValueError(f"unknown GPT size(s) {unknown}; choose from {', '.join(GPT_SIZES)}")
    tokens = _int_list(args.tokens, "--tokens")
    if any(int(t ** 0.5) ** 2 != t for t in tokens):
        raise ValueError(f"--tokens must be square numbers (a square grid), got {args.tokens}")
    batches = _int_list(args.batch_sizes, "--batch-sizes")
    methods, options = _bench_methods(args)
    need = [m for m in methods if depends_on_acceptance(m)]
    compression, source = {}, ""
    if need and args.compression_json:
        with open(args.compression_json) as f:
            measured = json.load(f)
        compression = {r["method"]: r["step_compression"] for r in measured["results"]}
        source = f"{args.compression_json} ({measured.get('model')}, {measured.get('tokens')} tokens)"
    elif need:
        from .pipeline import VarGenPipeline

        pipe = VarGenPipeline.load(args.model, device=args.device)
        measured = bench_speed(pipe, need, n=args.n, seed=args.seed, batch_size=args.batch_size,
                               sampling=_sampling(args), method_options=options)
        compression = {r["method"]: r["step_compression"] for r in measured["results"]}
        source = f"{args.model or 'the default model'} ({measured['tokens']} tokens, n={args.n}, seed {args.seed})"
    dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    report = bench_latency(sizes, batches, tokens, methods, compression, device=args.device, dtype=dtype,
                           sampling=_sampling(args), method_options=options, compile_mode=args.compile,
                           reps=args.reps, compression_source=source)
    print(format_latency_table(report))
    if args.json:
        write_atomic(args.json, json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


def cmd_bench_speed(args) -> int:
    from .eval.speed import bench_speed, format_table, write_report
    from .pipeline import VarGenPipeline

    if args.sizes:
        return cmd_bench_latency(args)

    pipe = VarGenPipeline.load(args.model, device=args.device)
    if args.compile:
        pipe.enable_compile(args.compile)
    methods, options = _bench_methods(args)
    report = bench_speed(pipe, methods, n=args.n, seed=args.seed, batch_size=args.batch_size,
                         sampling=_sampling(args), method_options=options)
    report["model"] = args.model or "default"
    print(f"model {report['model']}, {report['device']}, n={args.n}, seed={args.seed}, batch {args.batch_size}, "
          f"{report['tokens']} tokens, sampling {report['sampling']}")
    print(format_table(report))
    write_report(report, args.json, args.plot, pipe.gpt.grid)
    for path in (args.json, args.plot):
        if path:
            print(f"wrote {path}")
    return 0


def cmd_sample(args) -> int:
    from accelerate import PartialState

    from .pipeline import VarGenPipeline
    from .sample import pack_npz, plan_for_pipeline, read_prompts, sample_to_folder, start_run

    import torch

    # without CUDA the processes are CPU workers (gloo); accelerate only sets that up when told
    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    pipe = VarGenPipeline.load(args.model, device=args.device or state.device)
    pipe.check_decodes_images()  # before any decoding, not after the first batch
    items, _ = plan_for_pipeline(pipe, args.n, args.seed, prompts=read_prompts(args.prompts) if args.prompts else None,
                                 classes=args.classes, scene_seed=args.scene_seed)
    from .pipeline import default_model

    settings = {"model": args.model or default_model(), "n": args.n, "seed": args.seed, "method": args.method,
                "method_options": _method_options(args), "sampling": _sampling(args)}
    if state.is_main_process:
        start_run(args.out, settings, items)
    state.wait_for_everyone()
    start_run(args.out, settings, items)  # every process checks the folder's settings
    done = sample_to_folder(pipe, items, args.out, batch_size=args.batch_size, method=args.method,
                            method_options=_method_options(args), process_index=state.process_index,
                            num_processes=state.num_processes, progress=not args.quiet, **_sampling(args))
    print(f"process {state.process_index}/{state.num_processes}: drew {done['drawn']} images, "
          f"{done['skipped']} already there ({done['wall_s']:.1f} s) -> {args.out}")
    state.wait_for_everyone()
    if args.npz and state.is_main_process:
        print(f"wrote {pack_npz(args.out, args.n)}")
    return 0


def cmd_export(args) -> int:
    from .train.common import load_config
    from .train.export import export_model

    spec = load_config(args.spec)
    card = export_model(spec["name"], spec["vq_run"], spec["ar_run"], args.out or spec["out"], spec["prompts"],
                        spec["eval_data"], cfg_scale=spec.get("cfg_scale", 4.0), top_k=spec.get("top_k", 0),
                        seed=spec.get("seed", 0), notes=spec.get("notes"))
    psnr = ", ".join(f"{k} {v:.2f} dB" for k, v in card["reconstruction_psnr_db"].items())
    print(f"exported {card['name']}: reconstruction PSNR {psnr}, "
          f"files {sum(card['file_bytes'].values()) / 1e6:.1f} MB -> {args.out or spec['out']}")
    return 0


def cmd_train(args) -> int:
    from .train.common import load_config

    config = load_config(args.config)
    if args.steps:
        config["steps"] = args.steps
    out = args.out or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    if args.what == "tokenizer":
        from .train.tokenizer import train_tokenizer as recipe
    elif args.what == "classifier":
        from .train.classifier import train_classifier as recipe
    elif args.what == "liif":
        from .train.liif import train_liif as recipe
    elif args.what == "flex1d":
        from .train.flex1d import train_flex1d as recipe
    elif args.what == "lpd":
        from .train.lpd import train_lpd as recipe
    elif args.what == "nar":
        from .train.nar import train_nar as recipe
    elif args.what == "eagle":
        from .train.eagle import train_eagle as recipe
    elif args.what == "mulo":
        from .train.mulo import train_mulo as recipe
    else:
        from .train.ar import train_ar as recipe
    result = recipe(config, out)
    runs = result.get("run_dirs") or [out]  # a recipe that trains several parts logs each in its own folder
    logs = ", ".join(f"{d}/log.jsonl" for d in runs)
    print(f"trained {args.what} for {result['steps']} steps on {result['device']} in {result['wall_s']:.0f} s; "
          f"saved to {out} (log: {logs}; loss curves beside them as loss.png)")
    return 0


def cmd_generate(args) -> int:
    import numpy as np
    import torch
    from torchvision.utils import make_grid

    from .atomic import save_image_atomic
    from .pipeline import TINY_RANDOM, VarGenPipeline, default_model

    if args.size and args.scale:
        raise UsageError("give --size or --scale, not both")
    if args.liif and not (args.size or args.scale):
        raise UsageError("--liif renders at another size: give --size or --scale with it")
    if args.model is None:
        args.model = default_model()
        note = " (random weights: the images are noise)" if args.model == TINY_RANDOM else ""
        print(f"vargen: using the default model {args.model!r}{note}", file=sys.stderr)
    pipe = VarGenPipeline.load(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=args.quiet)
    if args.compile:
        pipe.enable_compile(args.compile)
    start = time.perf_counter()
    if args.size or args.scale:
        from .hf_pipeline import HFImagePipeline

        if isinstance(pipe, HFImagePipeline):
            raise UsageError("--size / --scale render through a LIIF decoder trained on a vargen tokenizer; "
                             f"{args.model} decodes with its own VQ decoder at its own size: drop them")
    height, width = args.size or (None, None)
    if args.scale:
        from .decoders.liif import output_size

        height, width = output_size(pipe.image_size, scale=args.scale)
    if args.liif:
        pipe.load_liif(args.liif)
    conditions = [c for c in (args.conditions or [""]) for _ in range(args.num_images)]
    out = pipe(conditions, unconditional=args.unconditional, **_sampling(args), seed=args.seed, height=height,
               width=width, output_type="pil", method=args.method, method_options=_method_options(args),
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


def _check_device(name) -> None:
    """A device torch knows and this machine has, before anything loads onto it."""
    if name is None:
        return
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {name}: no CUDA GPU is visible on this machine; use --device cpu")
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {name}: this machine has {count} CUDA GPU(s), cuda:0 .. cuda:{count - 1}")
    elif device.type != "cpu" and not getattr(torch, device.type).is_available():
        raise UsageError(f"--device {name}: no {device.type} device here; use --device cpu")


def _check_args(args) -> None:
    """Every option a command can check without a model, checked before one loads: values, combinations,
    device, method options, and that every output can be written."""
    from .decoding import SamplingConfig

    _check_device(getattr(args, "device", None))
    if hasattr(args, "cfg"):
        SamplingConfig(**_sampling(args)).check_values()
    for flag in ("lantern_delta", "lantern_lambda"):
        if getattr(args, flag, None) is not None:
            finite(f"--{flag.replace('_', '-')}", getattr(args, flag))
    method = getattr(args, "method", None)
    if method == "jacobi":
        given = [f"--{k.replace('_', '-')}" for k in SAMPLING_DEFAULTS if getattr(args, k) is not None]
        if given:
            raise UsageError(f"--method jacobi is greedy and would ignore {', '.join(given)}: drop them, or use "
                             "--method sjd for sampling")
    if method is not None and hasattr(args, "zipar_min_window"):
        _method_options(args)  # refuses a flag the method does not take, before any model loads
    if hasattr(args, "methods") and hasattr(args, "zipar_min_window"):
        _bench_methods(args)
    from .decoding.options import check_compile

    check_compile(_bench_methods(args)[0] if hasattr(args, "methods") else [method] if method else [],
                  getattr(args, "compile", None))
    for attr in getattr(args, "output_dirs", ()):
        if getattr(args, attr, None):
            writable_folder(getattr(args, attr))
    for attr in getattr(args, "output_files", ()):
        if getattr(args, attr, None):
            writable_file(getattr(args, attr), f"--{attr}")
    if getattr(args, "func", None) is cmd_generate:
        image_format(args.output)
        if args.max_memory is not None:
            parse_bytes(args.max_memory)
        if args.unconditional and args.conditions:
            raise UsageError("--unconditional draws without a prompt: drop the prompt(s), or drop --unconditional")
        if not args.unconditional and not args.conditions:
            raise UsageError("give a prompt or class to draw, or --unconditional for a text-to-image model")


def _add_debug_flag(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """``--debug`` before or after the command name, on every command (a traceback for errors)."""
    parser.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="show the traceback of an error")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in set(action.choices.values()):
                _add_debug_flag(child, top=False)


# failures a user can fix: VargenError, and the ValueError / FileNotFoundError / OSError (a full disk, a file
# that vanished) that library code raises with a message meant for users
USER_ERRORS = (VargenError, ValueError, FileNotFoundError, FloatingPointError, OSError)


def main(argv=None) -> int:
    parser = build_parser()
    _add_debug_flag(parser)
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "relax"):  # --method sjd --coupling maximal --relax lantern -> sjd+coupling+lantern
            from .decoding.methods import compose_method

            args.method = compose_method(args.method, args.coupling, args.relax)
        _check_args(args)
        return args.func(args)
    except USER_ERRORS as err:
        if args.debug:
            traceback.print_exc()
        print(f"vargen: error: {shorten(err, 2000)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
