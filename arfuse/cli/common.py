"""Options shared by subcommands."""
from __future__ import annotations

import argparse

from arfuse.scoring.windows import CONVENTIONS  # numpy only: `arfuse --help` must not import torch


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="weights' dtype; scores are always float32 log-softmax (default: float32)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (results do not depend on it)")


def add_score_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--window", type=int, default=1024, help="tokens per window (default: 1024)")
    p.add_argument("--stride", type=int, default=512, help="sliding convention: tokens between window starts (default: 512)")
    p.add_argument("--convention", choices=CONVENTIONS, default="sliding",
                   help="sliding: Hugging Face perplexity guide; disjoint: lm-evaluation-harness rolling windows")
    p.add_argument("--bos", choices=["auto", "always", "never"], default="auto",
                   help="prepend BOS: auto follows each tokenizer's default (default: auto)")
    p.add_argument("--topk", type=int, default=32, help="top-k tokens kept per position in the cache (default: 32)")
    p.add_argument("--no-cache", action="store_true", help="score without reading or writing the cache")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def score_config(args):
    from arfuse.scoring.scorer import ScoreConfig

    return ScoreConfig(window=args.window, stride=args.stride, convention=args.convention, bos=args.bos, topk=args.topk)


def _rule_options() -> dict[str, list]:
    """Every option a registered rule's parameter has (e.g. the cosine rule's --power), with the
    (rule, Param) pairs that take it."""
    from arfuse.fusion.registry import available_rules, get_rule

    out: dict[str, list] = {}
    for name in available_rules():
        for prm in get_rule(name).params:
            if prm.option:
                out.setdefault(prm.option, []).append((name, prm))
    return out


def add_rule_options(p: argparse.ArgumentParser, *, default: str = "linear") -> None:
    """--rule (any registered fusion rule), the options of the rules' parameters that have one
    (the cosine rule's --power and --embeddings), and --param NAME=VALUE for any parameter."""
    from arfuse.fusion.registry import available_rules, get_rule

    rules = available_rules()
    p.add_argument("--rule", default=default, metavar="RULE",
                   help=f"fusion rule (default: {default}): " + "; ".join(f"{n}: {get_rule(n).summary}" for n in rules))
    added: set[str] = set()
    for option, owners in _rule_options().items():
        prm = owners[0][1]
        if option in p._option_string_actions:  # the command's own option (eval's --topk): --param NAME=VALUE
            continue
        added.add(option)
        p.add_argument(option, dest=prm.name, type=None if prm.choices else float, choices=prm.choices or None,
                       help=" / ".join(f"--rule {r}" for r, _ in owners) + f": {prm.help}"
                       + (f" (default: {prm.default})" if prm.default is not None else ""))
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a parameter of the chosen rule (repeat for several)")
    p.set_defaults(_rule_option_names=frozenset(added))


def rule_params(args) -> dict:
    """The chosen rule's parameters from their own options and --param NAME=VALUE (numbers where they parse)."""
    from arfuse.errors import ArfuseError
    from arfuse.fusion.registry import get_rule

    params = {}
    for item in args.param:
        name, eq, value = item.partition("=")
        if not eq or not name.strip():
            raise ArfuseError(f"--param {item!r}: give NAME=VALUE, e.g. --param power=1.5")
        try:
            params[name.strip()] = float(value)
        except ValueError:
            params[name.strip()] = value.strip()
    given_by_option = {}
    for option, owners in _rule_options().items():
        name = owners[0][1].name
        if option not in getattr(args, "_rule_option_names", {option}):
            continue
        if getattr(args, name, None) is not None:
            params[name] = getattr(args, name)
            given_by_option[name] = option
    known = {p.name for p in get_rule(args.rule).params}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ArfuseError(f"{', '.join(given_by_option.get(n, n) for n in unknown)} "
                          f"{'is not a parameter' if len(unknown) == 1 else 'are not parameters'} of the {args.rule} "
                          f"rule (its parameters: {', '.join(sorted(known)) or 'none'})")
    return params
