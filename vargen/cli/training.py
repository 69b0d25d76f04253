"""`vargen train` (the recipes in configs/) and `vargen export` (a run packaged as a model)."""
from __future__ import annotations

import os

from .args import positive_int


RECIPES = ("tokenizer", "ar", "classifier", "liif", "flex1d", "lpd", "nar", "eagle", "mulo")  # `vargen train WHAT`


def add_train_parsers(sub) -> None:
    train = sub.add_parser("train", help="train a tokenizer, an AR generator or the FD-vargen classifier from a JSON "
                                         "recipe config",
                           description="Train with a recipe config (configs/*.json); reruns resume from OUT/state.")
    train.add_argument("what", choices=RECIPES,
                       help="what to train")
    train.add_argument("--config", required=True, help="recipe config (JSON), e.g. configs/scenes_vq.json")
    train.add_argument("--out", default=None, help="output folder (default runs/<config name>)")
    train.add_argument("--steps", type=positive_int, default=None, help="override the config's step count")
    train.set_defaults(func=cmd_train, output_dirs=("out",))

    export = sub.add_parser("export", help="package trained runs as an embedded model (fp16, samples, model card)")
    export.add_argument("spec", help="export spec (JSON): name, vq_run, ar_run, out, prompts, eval_data")
    export.add_argument("--out", default=None, help="override the spec's output folder")
    export.set_defaults(func=cmd_export, output_dirs=("out",))


def cmd_export(args) -> int:
    from ..train.common import load_config
    from ..train.export import export_model

    spec = load_config(args.spec)
    card = export_model(spec["name"], spec["vq_run"], spec["ar_run"], args.out or spec["out"], spec["prompts"],
                        spec["eval_data"], cfg_scale=spec.get("cfg_scale", 4.0), top_k=spec.get("top_k", 0),
                        seed=spec.get("seed", 0), notes=spec.get("notes"))
    psnr = ", ".join(f"{k} {v:.2f} dB" for k, v in card["reconstruction_psnr_db"].items())
    print(f"exported {card['name']}: reconstruction PSNR {psnr}, "
          f"files {sum(card['file_bytes'].values()) / 1e6:.1f} MB -> {args.out or spec['out']}")
    return 0


def cmd_train(args) -> int:
    from ..train.common import load_config, with_steps

    config = load_config(args.config)
    if args.steps:
        config = with_steps(config, args.steps)
    out = args.out or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    if args.what == "tokenizer":
        from ..train.tokenizer import train_tokenizer as recipe
    elif args.what == "classifier":
        from ..train.classifier import train_classifier as recipe
    elif args.what == "liif":
        from ..train.liif import train_liif as recipe
    elif args.what == "flex1d":
        from ..train.flex1d import train_flex1d as recipe
    elif args.what == "lpd":
        from ..train.lpd import train_lpd as recipe
    elif args.what == "nar":
        from ..train.nar import train_nar as recipe
    elif args.what == "eagle":
        from ..train.eagle import train_eagle as recipe
    elif args.what == "mulo":
        from ..train.mulo import train_mulo as recipe
    else:
        from ..train.ar import train_ar as recipe
    result = recipe(config, out)
    runs = result.get("run_dirs") or [out]  # a recipe that trains several parts logs each in its own folder
    logs = ", ".join(f"{d}/log.jsonl" for d in runs)
    print(f"trained {args.what} for {result['steps']} steps on {result['device']} in {result['wall_s']:.0f} s; "
          f"saved to {out} (log: {logs}; loss curves beside them as loss.png)")
    return 0


