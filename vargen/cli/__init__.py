"""The ``vargen`` command line: one module per command group; this one parses, checks and runs."""
from __future__ import annotations

import argparse
import sys
import traceback

from ..atomic import image_format
from ..errors import UsageError, VargenError, finite, shorten, writable_file, writable_folder
from ..memory import parse_bytes
from .args import SAMPLING_DEFAULTS, bench_methods, method_options, sampling
from .bench import add_bench_parser
from .evaluate import add_eval_parser
from .generate import add_generate_parser, cmd_generate
from .samples import add_sample_parser
from .training import add_train_parsers


def build_parser() -> argparse.ArgumentParser:
    from ..convert import add_convert_parser

    parser = argparse.ArgumentParser(prog="vargen", description="Fast autoregressive image generation.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_generate_parser, add_sample_parser, add_train_parsers, add_eval_parser, add_bench_parser,
                add_convert_parser):
        add(sub)
    return parser


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
    from ..decoding import SamplingConfig

    _check_device(getattr(args, "device", None))
    if hasattr(args, "cfg"):
        SamplingConfig(**sampling(args)).check_values()
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
        method_options(args)  # refuses a flag the method does not take, before any model loads
    if hasattr(args, "methods") and hasattr(args, "zipar_min_window"):
        bench_methods(args)
    from ..decoding.options import check_compile

    check_compile(bench_methods(args)[0] if hasattr(args, "methods") else [method] if method else [],
                  getattr(args, "compile", None))
    for attr in getattr(args, "output_dirs", ()):
        if getattr(args, attr, None):
            writable_folder(getattr(args, attr))
    for attr in getattr(args, "output_files", ()):
        if getattr(args, attr, None):
            writable_file(getattr(args, attr), f"--{attr}")
    if getattr(args, "max_memory", None) is not None:
        parse_bytes(args.max_memory)  # a bad size is refused before any model loads
    if getattr(args, "func", None) is cmd_generate:
        image_format(args.output)
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
            from ..decoding.methods import compose_method

            args.method = compose_method(args.method, args.coupling, args.relax, args.pac)
        _check_args(args)
        return args.func(args)
    except USER_ERRORS as err:
        if args.debug:
            traceback.print_exc()
        print(f"vargen: error: {shorten(err, 2000)}", file=sys.stderr)
        return 2


