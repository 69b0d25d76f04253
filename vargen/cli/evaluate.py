"""`vargen eval ...`: scene following, LIIF scales, 1D tokens, GenEval, FID."""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import load_local
from .args import (add_method_args, add_run_args, add_sampling_args, memory_budget,
                   method_options, positive_int, sampling)


def add_eval_parser(sub) -> None:
    evaluate = sub.add_parser("eval", help="evaluate generated images")
    eval_sub = evaluate.add_subparsers(dest="what", required=True)
    scenes = eval_sub.add_parser("scenes", help="caption following of a scene model on held-out scene prompts",
                                 description="Generate from N held-out scene captions and check colours, counts "
                                             "and positions against the exact scene metadata.")
    scenes.add_argument("--model", default=None, help="t2i model trained on scenes (default: the default model)")
    scenes.add_argument("-n", "--n", type=positive_int, default=100, help="number of scene prompts")
    scenes.add_argument("--seed", type=int, default=999, help="scene seed (training used 0 and 1)")
    add_sampling_args(scenes)
    scenes.add_argument("--colour-seeds", type=int, default=2, metavar="K",
                        help="the colour check: every 'a photo of a {colour} {shape}' (10 GenEval colours x 6 shapes) "
                             "drawn with seeds 0..K-1 (default 2; 0 skips it)")
    scenes.add_argument("--out", default="outputs/eval_scenes",
                        help="folder for scores.json, grid.png and colour_grid.png")
    add_run_args(scenes)
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
    sr.add_argument("--base", type=positive_int, default=None,
                    help="low-resolution scene size (default 128 for a token decoder, 32 for an image-input LIIF)")
    sr.add_argument("--n-scenes", type=positive_int, default=32, help="held-out scenes")
    sr.add_argument("--seed", type=int, default=10_000, help="scene seed")
    sr.add_argument("--json", default=None, help="write the table as JSON here")
    sr.add_argument("--device", default="cpu", help="torch device")
    sr.set_defaults(func=cmd_eval_sr, output_files=("json",))

    tok = eval_sub.add_parser("tokenizer", help="a scene tokenizer's ceiling: PSNR, scene checks, colours kept",
                              description="Held-out scenes through encode -> decode: reconstruction PSNR, the scene "
                                          "checks of `eval scenes` on the reconstructions (what a perfect generator "
                                          "could reach) and the colours single objects keep.")
    tok.add_argument("--vq", required=True, help="VQ tokenizer folder, e.g. vargen/weights/scenes-t2i/vq or OUT/vq")
    tok.add_argument("-n", "--n", type=positive_int, default=100, help="held-out scenes")
    tok.add_argument("--seed", type=int, default=999, help="scene seed (the recipes train on 0, 1 and 10)")
    tok.add_argument("--json", default=None, help="write the figures as JSON here")
    tok.add_argument("--device", default="cpu", help="torch device")
    tok.set_defaults(func=cmd_eval_tokenizer, output_files=("json",))

    flex = eval_sub.add_parser("flex1d", help="1D flexible tokenizer: reconstruction PSNR against token count",
                               description="Held-out scenes encoded with every prefix length of the 1D tokenizer, "
                                           "next to the 2D VQ tokenizer on the same scenes.")
    flex.add_argument("--tokenizer", required=True, help="Flex1DTokenizer folder (from `vargen train flex1d`)")
    flex.add_argument("--vq", default=None, help="2D VQ tokenizer to compare with, e.g. vargen/weights/scenes-t2i/vq")
    flex.add_argument("--vq-resolution", type=positive_int, nargs="+", default=[128],
                      help="resolutions to run the 2D VQ at")
    flex.add_argument("-n", "--n", type=positive_int, default=64, help="held-out scenes")
    flex.add_argument("--seed", type=int, default=10_000, help="scene seed (training uses 0-2)")
    flex.add_argument("--lengths", type=positive_int, nargs="+", default=None,
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
    geneval.add_argument("--limit", type=positive_int, default=None, help="only the first N prompts")
    geneval.add_argument("--n-samples", type=positive_int, default=4, help="images per prompt (GenEval: 4)")
    geneval.add_argument("--seed", type=int, default=0, help="sample n of prompt i uses seed + i * n_samples + n")
    geneval.add_argument("--batch-size", type=positive_int, default=16, help="images per decoding call")
    geneval.add_argument("--grid", action="store_true", help="also write each prompt's grid.png")
    add_method_args(geneval)
    add_sampling_args(geneval)
    geneval.add_argument("--score", action="store_true",
                         help="then run GenEval's official evaluator (needs --detector, --clip, --geneval-repo, "
                              "mmdet 2.x, open_clip, clip_benchmark, pandas and a CUDA GPU)")
    geneval.add_argument("--detector", default=None,
                         help="folder holding mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth "
                              "(geneval's evaluation/download_models.sh)")
    geneval.add_argument("--clip", default=None, help="open_clip ViT-L-14 'openai' weights file (or 'openai')")
    geneval.add_argument("--geneval-repo", default=None, help="a checkout of djghosh13/geneval")
    geneval.add_argument("--results", default=None, help="evaluator output (default OUT/results.jsonl)")
    geneval.add_argument("--quiet", action="store_true", help="no progress bar")
    add_run_args(geneval)
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


def _add_extractor_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--extractor", default="inception",
                        help="inception (clean-fid's, needs --inception), fd-vargen (the shipped CIFAR-10 "
                             "classifier) or a classifier folder from `vargen train classifier`")
    parser.add_argument("--inception", default=None,
                        help="local inception-2015-12-05.pt (clean-fid's TorchScript Inception) or its folder")
    parser.add_argument("--mode", default="clean", help="clean-fid mode: clean, legacy_tensorflow, legacy_pytorch")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per feature batch")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")


def _extractor(args):
    """``None`` (clean-fid's Inception) or the FD-vargen classifier named by ``--extractor``."""
    if args.extractor == "inception":
        return None
    from ..eval.classifier import load_fd_vargen

    return load_fd_vargen(None if args.extractor == "fd-vargen" else args.extractor)


def cmd_eval_fid(args) -> int:
    import json

    from ..atomic import write_atomic
    from ..eval.fid import compute_fid

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

    from ..eval.fid import reference_stats

    source = args.source
    if source.lstrip().startswith("{"):
        from ..data.registry import build_dataset

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

    from ..eval.scenes import colour_fidelity, colour_following, scene_following, tokenizer_ceiling
    from ..hf_pipeline import HFImagePipeline
    from ..pipeline import VarGenPipeline

    if args.colour_seeds < 0:
        raise ValueError(f"--colour-seeds takes a count of seeds >= 0, got {args.colour_seeds}")
    pipe = VarGenPipeline.load(args.model, device=args.device, torch_dtype=args.dtype)
    pipe.set_memory_budget(memory_budget(args))
    if isinstance(pipe, HFImagePipeline):
        raise ValueError("scene evaluation scores models trained on vargen's rendered scenes against their tokenizer; "
                         f"{args.model} is a Hugging Face model: use `vargen eval geneval` or `vargen bench report`")
    if not pipe.takes_text:
        raise ValueError("scene evaluation needs a text-to-image model (e.g. scenes-t2i); "
                         f"{args.model or 'the default model'} is class-conditional")
    result = scene_following(pipe, n=args.n, seed=args.seed, **sampling(args))
    os.makedirs(args.out, exist_ok=True)
    images = torch.from_numpy(result.pop("images")).permute(0, 3, 1, 2).float() / 255
    save_image(images, os.path.join(args.out, "grid.png"), nrow=10, padding=2)
    result.update(model=args.model, n_prompts=args.n, scene_seed=args.seed, sampling=sampling(args),
                  tokenizer_ceiling=tokenizer_ceiling(pipe.vq, n=args.n, seed=args.seed),
                  tokenizer_colours=colour_fidelity(pipe.vq))
    if args.colour_seeds:
        colours = colour_following(pipe, seeds=range(args.colour_seeds), **sampling(args))
        grid = torch.from_numpy(colours.pop("images")).permute(0, 3, 1, 2).float() / 255
        save_image(grid, os.path.join(args.out, "colour_grid.png"), nrow=12, padding=2)
        result["colour_check"] = colours
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
    if args.colour_seeds:
        c = result["colour_check"]
        print(f"colour check ({c['n']} single-object prompts): right colour {c['right_colour']:.2f}, exactly one "
              f"object {c['one_object']:.2f}, {c['colours_drawn']} of {len(c['by_colour'])} colours drawn (missing: "
              + (", ".join(k for k, v in c["by_colour"].items() if v == 0) or "none") + ")")
    print(f"wrote {args.out}/scores.json, {args.out}/grid.png" + (" and colour_grid.png" if args.colour_seeds else ""))
    return 0


def cmd_eval_sr(args) -> int:
    import json

    from ..atomic import write_atomic
    from ..decoders import LIIF, LIIFTokenDecoder
    from ..eval.sr import compare_benchmark, compare_scales, format_table, scale_consistency, upsamplers
    from ..tokenizers import VQTokenizer

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


def cmd_eval_tokenizer(args) -> int:
    import json

    import torch

    from ..atomic import write_atomic
    from ..eval.scenes import colour_fidelity, tokenizer_ceiling
    from ..tokenizers import VQTokenizer
    from ..train.export import reconstruction_psnr

    vq = load_local(VQTokenizer, args.vq, "VQ tokenizer").to(args.device).eval()
    with torch.no_grad():
        psnr = reconstruction_psnr(vq, [{"name": "scenes", "resolution": 128, "seed": args.seed, "length": args.n}],
                                   n=args.n)
    cap, colours = tokenizer_ceiling(vq, n=args.n, seed=args.seed), colour_fidelity(vq)
    print(f"{args.n} held-out scenes (seed {args.seed}), 128 px: reconstruction {psnr:.2f} dB")
    checks = ", ".join(f"{name} {cap[key]:.2f}" for key, name in (("count", "count"), ("color", "colour"),
                                                                   ("position", "position")) if key in cap)
    print(f"scene checks on the reconstructions: exact {cap['exact']:.2f} ({checks}), GenEval overall "
          f"{cap['overall']:.2f}")
    print(f"colours kept: {colours['colours_kept']} of {len(colours['by_colour'])}, "
          f"{colours['objects_kept']:.0%} of single objects decoded in their colour (lost: "
          + (", ".join(c for c, v in colours["by_colour"].items() if v < 0.5) or "none") + ")")
    if args.json:
        figures = {"vq": args.vq, "n": args.n, "seed": args.seed, "psnr_db": psnr, "ceiling": cap, "colours": colours}
        write_atomic(args.json, json.dumps(figures, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


def cmd_eval_flex1d(args) -> int:
    from ..eval.flex1d import evaluate, format_table

    table = evaluate(args.tokenizer, args.vq, args.n, args.seed, args.lengths, args.vq_resolution, args.out,
                     args.device)
    print(format_table(table))
    print(f"wrote {args.out}/psnr_vs_tokens.json, psnr_vs_tokens.png, recon.png")
    return 0


def cmd_eval_geneval(args) -> int:
    from ..eval.geneval import (GenEvalUnavailable, check_layout, format_summary, read_metadata, score_geneval,
                               write_geneval)
    from ..pipeline import VarGenPipeline

    metadata = read_metadata(args.metadata)  # a wrong path fails before a model is loaded
    pipe = VarGenPipeline.load(args.model, device=args.device, torch_dtype=args.dtype)
    pipe.set_memory_budget(memory_budget(args))
    if not pipe.takes_text:
        raise ValueError("GenEval needs a text-to-image model (e.g. scenes-t2i); "
                         f"{args.model or 'the default model'} is class-conditional")
    done = write_geneval(pipe, metadata, args.out, n_samples=args.n_samples, seed=args.seed,
                         batch_size=args.batch_size, limit=args.limit, progress=not args.quiet, grid=args.grid,
                         method=args.method, method_options=method_options(args), **sampling(args))
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


