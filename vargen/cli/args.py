"""Argument types and the flag groups the commands share (sampling, methods and their options)."""
from __future__ import annotations

import argparse
import math
import sys


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be > 0 and finite, got {text}")
    return value


def image_size(text: str) -> tuple:
    """``"512x384"`` (width x height, as image tools write it) -> ``(height, width)``."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 512x384, got {text!r}")
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return h, w


class OldSpellingWarns(argparse.Action):
    """One spelling per option across commands: the first option string is it; the others still work
    and say so."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string != self.option_strings[0]:
            print(f"vargen: warning: {option_string} is an old spelling of {self.option_strings[0]}; use that",
                  file=sys.stderr)
        setattr(namespace, self.dest, values)


def method_names() -> list:
    from ..decoding.methods import METHODS

    return sorted(METHODS)


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="sampling temperature (default 1; 0 = greedy)")
    parser.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (default 0 = all)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus mass to keep (default 1 = all)")


def add_lantern_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lantern-delta", type=float, default=None, help="LANTERN pooled-mass budget (default 0.1)")
    parser.add_argument("--lantern-lambda", type=float, default=None, help="LANTERN++ lambda mode instead of delta")
    parser.add_argument("--lantern-k", type=positive_int, default=None, help="LANTERN neighbours per code (1000)")
    parser.add_argument("--pac-width", type=positive_int, default=None, help="SJD-PAC tree width K (3)")
    parser.add_argument("--pac-depth", type=non_negative_int, default=None,
                        help="SJD-PAC tree levels below the root (2)")
    parser.add_argument("--pac-chain", type=non_negative_int, default=None,
                        help="SJD-PAC: window drafts each off-main tree leaf goes on with (0)")
    parser.add_argument("--pac-siblings", choices=("left", "q"), default=None,
                        help="SJD-PAC tree candidates after the draft: left = the previous cell's token, then draws "
                             "from q (default); q = all drawn from q (the paper)")


def add_method_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default="ar", help="decoding method: " + ", ".join(method_names()))
    parser.add_argument("--coupling", default="none", help="with --method sjd: none, maximal or gumbel redraws")
    parser.add_argument("--relax", default="none", help="with --method sjd: none, lantern or gsd acceptance")
    parser.add_argument("--pac", action="store_true", help="with --method sjd: SJD-PAC (draft tree + continuation)")
    add_decode_option_flags(parser)


def add_decode_option_flags(parser: argparse.ArgumentParser) -> None:
    """Every method's own options (routed by :func:`vargen.decoding.options.route_options`: each reaches every
    selected method that takes it, and one no selected method takes is refused)."""
    parser.add_argument("--window", type=positive_int, default=None,
                        help="drafts per verify pass (sjd, jacobi, gsd: default 16) and row lead (zipar: default 8), "
                             "for every selected method that has a window")
    parser.add_argument("--init", default=None,
                        help="draft initialisation (sjd, jacobi): random, left, above (up), left-dist (sample)")
    parser.add_argument("--zipar-window", type=positive_int, default=None,
                        help="the zipar methods' row lead only (beside --window for the others)")
    parser.add_argument("--zipar-min-window", "--min-window", dest="zipar_min_window", type=positive_int,
                        default=None, action=OldSpellingWarns,
                        help="zipar-adaptive: row lead at which a row starts early (default window // 2)")
    parser.add_argument("--lpd", default=None, metavar="PATH",
                        help="lpd: LPD model folder (default: the model's own lpd/, e.g. scenes-t2i/lpd)")
    parser.add_argument("--lpd-steps", type=positive_int, default=None, help="lpd: forward passes (default 20)")
    parser.add_argument("--nar", default=None, metavar="PATH",
                        help="nar: NAR model folder (default: the model's own nar/, e.g. scenes-t2i/nar)")
    parser.add_argument("--eagle", default=None, metavar="PATH",
                        help="eagle: EAGLE drafter folder (default: the model's own eagle/, e.g. scenes-t2i/eagle)")
    parser.add_argument("--eagle-tree", default=None,
                        help="eagle: draft tree: dynamic (EAGLE-2, default), chain or mc_sim_25 (static)")
    parser.add_argument("--eagle-depth", type=positive_int, default=None,
                        help="eagle: draft depth (dynamic / chain, default 5; dynamic on a CPU 4)")
    parser.add_argument("--eagle-topk", type=positive_int, default=None,
                        help="eagle: dynamic tree: children per node and nodes expanded per depth (default 8; 4 on a CPU)")
    parser.add_argument("--eagle-tokens", type=positive_int, default=None,
                        help="eagle: dynamic tree: draft nodes verified per pass (default 48; 16 on a CPU)")
    parser.add_argument("--mulo", default=None, metavar="PATH",
                        help="mulo: MuLo drafter + up-sampler folder (default: the model's own mulo/)")
    parser.add_argument("--mulo-radius", type=int, default=None, help="mulo: re-verify radius after round 1 (1)")
    parser.add_argument("--mulo-expand", type=int, default=None, help="mulo: radius growth per round (1)")
    parser.add_argument("--mulo-rounds", type=positive_int, default=None,
                        help="mulo: verify rounds at most (default: until nothing is pending)")
    parser.add_argument("--mulo-finish", default=None, choices=["accept", "ar"],
                        help="mulo: cells still pending at the round limit: accept them or plain AR (accept)")
    add_lantern_args(parser)


def add_compile_arg(parser: argparse.ArgumentParser) -> None:
    from ..models.compiled import COMPILE_MODES

    parser.add_argument("--compile", nargs="?", const="reduce-overhead", default=None, choices=COMPILE_MODES,
                        metavar="MODE", help="decode steps under torch.compile (default mode reduce-overhead: "
                                             "CUDA graphs on a GPU): each step of SJD (copying inits), ZipAR "
                                             "(fixed and adaptive), PJD, LPD and NAR as one graph, the forward "
                                             "of the other methods; the first call per shape compiles")


def method_options(args) -> dict:
    """The options of ``--method`` from its flags (refusing a flag the method does not take)."""
    from ..decoding.options import route_options

    return route_options([args.method], vars(args))[args.method]


SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}


def sampling(args) -> dict:
    given = {k: getattr(args, k) for k in SAMPLING_DEFAULTS}
    return {"cfg_scale": args.cfg, **{k: SAMPLING_DEFAULTS[k] if v is None else v for k, v in given.items()}}


def add_bench_args(parser: argparse.ArgumentParser, methods: str, n: int, batch_size: int) -> None:
    """The flags every benchmark shares: model, methods and their options, images and seeds, sampling."""
    parser.add_argument("--model", default=None, help="embedded model, pipeline folder, hf:DIR (Hugging Face folder) or tiny-random")
    parser.add_argument("--methods", default=methods,
                        help="comma-separated methods (ar is always run): " + ", ".join(method_names()))
    parser.add_argument("-n", "--n", type=positive_int, default=n, help="images per method")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i for every method")
    parser.add_argument("--batch-size", type=positive_int, default=batch_size, help="images per decoding call")
    add_dtype_arg(parser)
    add_decode_option_flags(parser)
    add_sampling_args(parser)


def bench_methods(args) -> tuple:
    """``(methods, options per method)`` from ``--methods`` and the option flags (each routed to every method
    that takes it)."""
    from ..decoding.options import route_options

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    return methods, route_options(methods, vars(args))


def int_list(text: str, flag: str) -> list:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{flag} takes positive integers, got {text!r}")
    return values




def add_dtype_arg(parser: argparse.ArgumentParser) -> None:
    from ..precision import DTYPE_CHOICES

    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="the generator's weights and activations: auto (default: bf16 where the hardware runs "
                             "it natively, e.g. AVX-512 BF16 CPUs and CUDA GPUs; else fp32), bf16, fp16 (GPU) or "
                             "fp32; probabilities, acceptance and sampling stay fp32")


def add_max_memory_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-memory", default=None, metavar="SIZE",
                        help="memory budget for decoding and rendering images, e.g. 2G (default: a quarter of the "
                             "available RAM, at most 1G); images and pixels are processed in chunks that fit")


def memory_budget(args):
    """``--max-memory`` in bytes, or ``None`` for the default."""
    from ..memory import parse_bytes

    return parse_bytes(args.max_memory) if getattr(args, "max_memory", None) else None


def add_run_args(parser: argparse.ArgumentParser, device: str = "cpu") -> None:
    """Where and how a command that runs the generator runs it: device, precision, memory budget."""
    parser.add_argument("--device", default=device, help="torch device")
    add_dtype_arg(parser)
    add_max_memory_arg(parser)
