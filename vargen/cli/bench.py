"""`vargen bench speed` and `vargen bench report`: every method against plain AR, same seeds; `vargen bench
train`: a recipe's seconds per step per precision."""
from __future__ import annotations

from ..errors import UsageError
from .args import add_bench_args, add_compile_arg, bench_methods, int_list, positive_int, sampling
from .training import RECIPES


def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks: decoding speed next to quality, method against AR")
    bench_sub = bench.add_subparsers(dest="what", required=True)
    speed = bench_sub.add_parser("speed", help="forward passes, latency and quality proxies of decoding methods",
                                 description="Decode the same conditions and seeds with every method and compare "
                                             "with plain AR in the same run.")
    add_bench_args(speed, methods="ar,sjd,sjd+coupling", n=32, batch_size=8)
    speed.add_argument("--device", default="cpu", help="torch device")
    add_compile_arg(speed)
    speed.add_argument("--json", default=None, help="write the report as JSON here")
    speed.add_argument("--plot", default=None, help="write accepted-length histograms and acceptance maps (PNG)")
    latency = speed.add_argument_group(
        "latency table", "with --sizes: time every method's steps on random-weight LlamaGen GPTs of these sizes "
                         "against AR and the memory-bandwidth floor; SJD-family step counts come from --model's "
                         "trained step compression (or --compression-json)")
    latency.add_argument("--sizes", default=None, help="comma-separated GPT sizes, e.g. GPT-B,GPT-XL")
    latency.add_argument("--tokens", default=None, help="image tokens per sample (square grids; default 256,1024)")
    speed.add_argument("--batch-sizes", default=None,
                       help="comma-separated batch sizes: a sweep (e.g. 1,4,16) with images/s and latency per image "
                            "per method; with --sizes, the latency table's batches (default 1,8)")
    speed.add_argument("--reps", type=positive_int, default=None,
                       help="timed decodes of each batch per method, the methods taking turns (median; default 1); "
                            "with --sizes, per latency cell (default 2)")
    latency.add_argument("--compression-json", default=None,
                         help="step compression from a previous `bench speed --json` instead of measuring it")
    speed.set_defaults(func=cmd_bench_speed, output_files=("json", "plot"))

    train = bench_sub.add_parser("train", help="seconds per training step of a recipe, fp32 against bf16 "
                                               "(and compiled)",
                                 description="Run a recipe for a few steps per precision, each in a fresh process, "
                                             "and report the median seconds per step (the first step of each run "
                                             "left out) with the speed-up over the first precision.")
    train.add_argument("recipe", choices=RECIPES, help="which recipe")
    train.add_argument("--config", required=True, help="its config (JSON), e.g. configs/scenes_t2i_bf16.json")
    train.add_argument("--steps", type=positive_int, default=4, help="steps per run (the first is not timed)")
    train.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    train.add_argument("--compile", action="store_true", help="also time each precision compiled (ar only)")
    train.add_argument("--json", default=None, help="write the table as JSON here")
    train.set_defaults(func=cmd_bench_train, output_files=("json",))

    report = bench_sub.add_parser("report", help="sample every method on the same seeds; speed next to quality",
                                  description="Draw the same N images with every method (resumable PNG folders "
                                              "under OUT/<method>) and write one table: forward passes, step "
                                              "compression, latency, speedup, FD-vargen against AR with its noise "
                                              "floor, and the exact scene score for scene prompts, each with a "
                                              "95% bootstrap interval (report.md, report.json, report.png).")
    add_bench_args(report, methods="ar,sjd,sjd+coupling,sjd+lantern,gsd,zipar", n=256, batch_size=16)
    report.add_argument("--scene-seed", type=int, default=999, help="t2i: held-out scene prompts' seed")
    report.add_argument("--extractor", default=None,
                        help="FD-vargen classifier folder (default: the shipped fd-vargen-cifar10)")
    report.add_argument("--reference", default=None,
                        help="also FD to real data: an image folder or a .npz from `vargen eval fid-stats` made "
                             "with the same extractor")
    report.add_argument("--bootstrap", type=positive_int, default=200, help="bootstrap rounds for the intervals")
    report.add_argument("--out", default="outputs/report", help="folder for the sample sets and the report")
    report.add_argument("--device", default="cpu", help="torch device")
    report.add_argument("--quiet", action="store_true", help="no progress bars")
    report.set_defaults(func=cmd_bench_report, output_dirs=("out",))


def cmd_bench_train(args) -> int:
    import json

    from ..eval.train_speed import bench_train, format_train_bench
    from ..train.common import load_config

    report = bench_train(args.recipe, load_config(args.config), steps=args.steps,
                         precisions=[p.strip() for p in args.precisions.split(",") if p.strip()], compile=args.compile)
    print(format_train_bench(report))
    if args.json:
        from ..atomic import write_atomic

        write_atomic(args.json, json.dumps(report, indent=2))
    return 0


def cmd_bench_report(args) -> int:
    from ..eval.report import bench_report, format_report, write_report
    from ..pipeline import VarGenPipeline

    pipe = VarGenPipeline.load(args.model, device=args.device, torch_dtype=args.dtype)
    pipe.check_decodes_images()  # the report scores images
    methods, options = bench_methods(args)
    extractor = None
    if args.extractor:
        from ..eval.classifier import load_fd_vargen

        extractor = load_fd_vargen(args.extractor, device=args.device)
    report = bench_report(pipe, methods, args.n, args.out, seed=args.seed, batch_size=args.batch_size,
                          sampling=sampling(args), method_options=options, extractor=extractor,
                          scene_seed=args.scene_seed, model_name=args.model, reference=args.reference,
                          bootstrap=args.bootstrap,
                          progress=not args.quiet)
    print(f"model {report['model']}, {report['device']}, n={args.n}, seed={args.seed}, batch {args.batch_size}, "
          f"sampling {report['sampling']}")
    print(format_report(report))
    paths = write_report(report, args.out)
    print("wrote " + ", ".join(paths.values()))
    return 0


def cmd_bench_latency(args) -> int:
    import json

    from ..atomic import write_atomic
    from ..eval.latency import bench_latency, depends_on_acceptance, format_latency_table
    from ..eval.speed import bench_speed
    from ..models.llamagen import GPT_SIZES

    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in GPT_SIZES]
    if unknown:
        raise ValueError(f"unknown GPT size(s) {unknown}; choose from {', '.join(GPT_SIZES)}")
    tokens = int_list(args.tokens or "256,1024", "--tokens")
    if any(int(t ** 0.5) ** 2 != t for t in tokens):
        raise ValueError(f"--tokens must be square numbers (a square grid), got {args.tokens}")
    batches = int_list(args.batch_sizes or "1,8", "--batch-sizes")
    methods, options = bench_methods(args)
    need = [m for m in methods if depends_on_acceptance(m)]
    compression, source = {}, ""
    if need and args.compression_json:
        with open(args.compression_json) as f:
            measured = json.load(f)
        compression = {r["method"]: r["step_compression"] for r in measured["results"]}
        source = f"{args.compression_json} ({measured.get('model')}, {measured.get('tokens')} tokens)"
    elif need:
        from ..pipeline import VarGenPipeline

        pipe = VarGenPipeline.load(args.model, device=args.device, torch_dtype=args.dtype)
        measured = bench_speed(pipe, need, n=args.n, seed=args.seed, batch_size=args.batch_size,
                               sampling=sampling(args), method_options=options)
        compression = {r["method"]: r["step_compression"] for r in measured["results"]}
        source = f"{args.model or 'the default model'} ({measured['tokens']} tokens, n={args.n}, seed {args.seed})"
    from ..precision import dtype_name, resolve_dtype

    dtype = dtype_name(resolve_dtype(args.dtype, args.device))
    report = bench_latency(sizes, batches, tokens, methods, compression, device=args.device, dtype=dtype,
                           sampling=sampling(args), method_options=options, compile_mode=args.compile,
                           reps=args.reps or 2, compression_source=source)
    print(format_latency_table(report))
    if args.json:
        write_atomic(args.json, json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


def cmd_bench_speed(args) -> int:
    from ..eval.speed import bench_speed, format_table, write_report
    from ..pipeline import VarGenPipeline

    if args.sizes:
        return cmd_bench_latency(args)
    latency_only = [f for f, v in (("--tokens", args.tokens), ("--compression-json", args.compression_json))
                    if v is not None]
    if latency_only:
        raise UsageError(f"{', '.join(latency_only)} belong to the latency table: give --sizes, or drop them")

    pipe = VarGenPipeline.load(args.model, device=args.device, torch_dtype=args.dtype)
    if args.compile:
        pipe.enable_compile(args.compile)
    methods, options = bench_methods(args)
    if args.batch_sizes:
        return _batch_sweep(args, pipe, methods, options)
    report = bench_speed(pipe, methods, n=args.n, seed=args.seed, batch_size=args.batch_size,
                         sampling=sampling(args), method_options=options, reps=args.reps or 1)
    report["model"] = args.model or "default"
    print(f"model {report['model']}, {report['device']}, n={args.n}, seed={args.seed}, batch {args.batch_size}, "
          f"{report['tokens']} tokens, sampling {report['sampling']}, methods in turn, {report['reps']} timed "
          f"decode(s) per batch")
    print(format_table(report))
    write_report(report, args.json, args.plot, pipe.gpt.grid)
    for path in (args.json, args.plot):
        if path:
            print(f"wrote {path}")
    return 0




def _batch_sweep(args, pipe, methods, options) -> int:
    """``bench speed --batch-sizes 1,4,16``: the same images and seeds at each batch size; a user's question is
    how long one image takes and how many come out per second, next to plain AR at the same batch size."""
    import json

    from ..atomic import write_atomic
    from ..eval.speed import bench_speed, format_sweep

    sweep = []
    for batch in int_list(args.batch_sizes, "--batch-sizes"):
        report = bench_speed(pipe, methods, n=max(args.n, batch), seed=args.seed, batch_size=batch,
                             sampling=sampling(args), method_options=options, reps=args.reps or 1)
        sweep.append(report)
    print(f"model {args.model or 'default'}, {sweep[0]['device']}, {sweep[0]['dtype']}, seed={args.seed}, "
          f"{sweep[0]['tokens']} tokens")
    print(format_sweep(sweep))
    if args.json:
        write_atomic(args.json, json.dumps({"sweep": sweep}, indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        raise UsageError("--plot draws one batch size's report: drop --batch-sizes, or --plot")
    return 0
