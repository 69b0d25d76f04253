"""`vargen sample`: numbered PNG sets for FID and benchmarks (sharded, resumable)."""
from __future__ import annotations

from .args import (add_dtype_arg, add_max_memory_arg, add_method_args, add_sampling_args, memory_budget,
                   method_options, positive_int, sampling)


def add_sample_parser(sub) -> None:
    sample = sub.add_parser("sample", help="draw N numbered PNGs for FID / benchmarks (sharded, resumable)",
                            description="Draw images 000000.png .. N-1 into a folder. Image i has a fixed condition "
                                        "and seed (seed + i); `accelerate launch` splits the indices across "
                                        "processes; a rerun skips finished images and draws only the missing ones.")
    sample.add_argument("--model", default=None, help="embedded model, pipeline folder, hf:DIR (Hugging Face folder) or tiny-random")
    sample.add_argument("-n", "--n", type=positive_int, required=True, help="number of images (e.g. 50000)")
    sample.add_argument("--out", required=True, help="output folder")
    sample.add_argument("--classes", default="balanced", choices=["balanced", "random"],
                        help="c2i: class i %% C for image i, or seeded random classes")
    sample.add_argument("--prompts", default=None,
                        help="t2i: prompt file (.txt one per line, or .jsonl with prompt/caption); "
                             "default: held-out scene captions")
    sample.add_argument("--scene-seed", type=int, default=999, help="t2i default prompts: scene seed")
    sample.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    sample.add_argument("--batch-size", type=positive_int, default=16, help="images per decoding call")
    add_method_args(sample)
    add_dtype_arg(sample)
    add_sampling_args(sample)
    sample.add_argument("--npz", action="store_true", help="also pack samples_N.npz (arr_0, ADM / LlamaGen format)")
    sample.add_argument("--device", default=None, help="torch device (default: the accelerate process's device)")
    sample.add_argument("--quiet", action="store_true", help="no progress bar")
    add_max_memory_arg(sample)
    sample.set_defaults(func=cmd_sample, output_dirs=("out",))


def cmd_sample(args) -> int:
    from accelerate import PartialState

    from ..pipeline import VarGenPipeline
    from ..sample import pack_npz, plan_for_pipeline, read_prompts, sample_to_folder, start_run

    import torch

    # without CUDA the processes are CPU workers (gloo); accelerate only sets that up when told
    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    pipe = VarGenPipeline.load(args.model, device=args.device or state.device, torch_dtype=args.dtype)
    pipe.set_memory_budget(memory_budget(args))
    pipe.check_decodes_images()  # before any decoding, not after the first batch
    items, _ = plan_for_pipeline(pipe, args.n, args.seed, prompts=read_prompts(args.prompts) if args.prompts else None,
                                 classes=args.classes, scene_seed=args.scene_seed)
    from ..pipeline import default_model

    settings = {"model": args.model or default_model(), "n": args.n, "seed": args.seed, "method": args.method,
                "method_options": method_options(args), "sampling": sampling(args),
                "dtype": str(next(pipe.gpt.parameters()).dtype).replace("torch.", "")}
    if state.is_main_process:
        start_run(args.out, settings, items)
    state.wait_for_everyone()
    start_run(args.out, settings, items)  # every process checks the folder's settings
    done = sample_to_folder(pipe, items, args.out, batch_size=args.batch_size, method=args.method,
                            method_options=method_options(args), process_index=state.process_index,
                            num_processes=state.num_processes, progress=not args.quiet, **sampling(args))
    print(f"process {state.process_index}/{state.num_processes}: drew {done['drawn']} images, "
          f"{done['skipped']} already there ({done['wall_s']:.1f} s) -> {args.out}")
    state.wait_for_everyone()
    if args.npz and state.is_main_process:
        print(f"wrote {pack_npz(args.out, args.n)}")
    return 0


