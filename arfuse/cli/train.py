"""`arfuse train`: train a small LM (Transformer, LSTM, GRU) on any tokenizer, or a whole zoo."""
from __future__ import annotations

import argparse
import json
from dataclasses import fields

from arfuse.errors import ArfuseError

# the options most runs set, with their help; every other TrainConfig field gets a flag too
MAIN_HELP = {
    "arch": "transformer (the paper's 6-layer reference), transformer-small, lstm or gru",
    "data": "training text: kjv[:90%%], tinyshakespeare[:90%%], enwiki (Wikipedia sample, markup stripped) or a file",
    "tokenizer": "word (built from the data), gpt2, gpt-neox, smollm2-135m, a .gguf file, a tokenizer.json, "
                 "a folder or a hub id",
    "out": "the run folder (resumed when it holds the same run)",
    "valid": "validation text (default: the last valid_fraction of --data)",
}


def register(sub) -> None:
    from arfuse.train.config import ARCHS, TrainConfig, _field_types, base_type

    p = sub.add_parser(
        "train", help="train a small LM (transformer, lstm, gru) or a zoo of them",
        description="Train a small causal LM with the paper's recipes (defaults are the paper's; any option can be "
                    "overridden here or in a TOML/JSON --config). The run folder is resumable and loads with "
                    "`arfuse eval --small FOLDER`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="a TOML or JSON file of options (command-line flags override it)")
    p.add_argument("--zoo", metavar="TOML", help="build every model of a zoo recipe (e.g. configs/zoo.toml)")
    p.add_argument("--only", action="append", metavar="NAME", help="with --zoo: build only these entries (repeat, or comma-separated)")
    p.add_argument("--list", action="store_true", help="with --zoo: list the entries and their status, train nothing")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any option, e.g. --set lr=1e-3")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    types_ = _field_types()
    g = p.add_argument_group("training options (default: the architecture's preset; see docs/training.md)")
    for f in fields(TrainConfig):
        tp, _ = base_type(types_[f.name])
        flag = "--" + f.name.replace("_", "-")
        helptext = MAIN_HELP.get(f.name, f"(default: {f.default})" if f.name not in ("arch",) else "")
        if f.name == "arch":
            g.add_argument(flag, choices=None, metavar="ARCH", help=MAIN_HELP["arch"] + f" (one of {', '.join(ARCHS)})")
        elif tp is bool:
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        else:
            g.add_argument(flag, type=str, default=None, metavar=f.name.upper(), help=helptext)
    p.set_defaults(func=run)


def overrides_from_args(args) -> dict:
    from arfuse.train.config import TrainConfig

    out = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    for item in args.set:
        if "=" not in item:
            raise ArfuseError(f"--set {item!r}: write KEY=VALUE, e.g. --set lr=1e-3")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = v.strip()
    return out


def run(args) -> int:
    log = (lambda *a, **k: None) if args.quiet else print
    if args.zoo:
        from arfuse.train.zoo import build_zoo, list_zoo

        if args.list:
            list_zoo(args.zoo, only=_names(args.only))
            return 0
        results = build_zoo(args.zoo, only=_names(args.only), overrides=overrides_from_args(args),
                            progress=None if not args.quiet else False, log=log)
        if args.json:
            print(json.dumps(results, indent=2))
        return 0
    if args.only or args.list:
        raise ArfuseError("--only and --list go with --zoo")
    from arfuse.train import TrainConfig, train

    cfg = TrainConfig.resolve(overrides_from_args(args), file=args.config)
    res = train(cfg, progress=None if not args.quiet else False, log=log)
    summary = {"out": str(res.path), "arch": cfg.arch, "num_parameters": res.num_parameters, "step": res.step,
               "total_steps": res.total_steps, "val_loss": res.val_loss, "val_ppl": res.val_ppl,
               "seconds": round(res.seconds, 1), "resumed_from": res.resumed_from, "already_done": res.already_done}
    if args.json:
        print(json.dumps(summary, indent=2))
    elif res.already_done:
        print(f"{res.path} is already trained ({res.num_parameters:,} parameters, {res.step:,} steps): "
              f"val loss {res.val_loss:.4f}, perplexity {res.val_ppl:.2f}; nothing to do")
    return 0


def _names(only: list[str] | None) -> list[str] | None:
    """--only a --only b and --only a,b alike."""
    return None if not only else [n.strip() for item in only for n in item.split(",") if n.strip()]
