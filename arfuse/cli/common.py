"""Options shared by subcommands."""
from __future__ import annotations

import argparse

from arfuse.scoring.windows import CONVENTIONS  # numpy only: `arfuse --help` must not import torch


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda, cuda:N, auto (CUDA when available), or map: a model larger than one GPU spread "
                        "over every visible GPU (transformers device_map='auto'; default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="weights' dtype; scores are always float32 log-softmax (default: float32)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (results do not depend on it)")


DEFAULT_WINDOW = 1024  # tokens per window when no model of the command has a shorter context


def add_score_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--window", type=int, default=None,
                   help=f"tokens per window (default: {DEFAULT_WINDOW}, or the shortest context among the models "
                        "when that is smaller, e.g. 512 for stories260k)")
    p.add_argument("--stride", type=int, default=None,
                   help="sliding convention: tokens between window starts (default: half the window)")
    p.add_argument("--convention", choices=CONVENTIONS, default="sliding",
                   help="sliding: Hugging Face perplexity guide; disjoint: lm-evaluation-harness 0.4.13 rolling windows (its numbers exactly: a prefix token, BOS else EOS, so the first token is scored); blocks: consecutive windows with no prefix token (nanoGPT's validation cut)")
    p.add_argument("--bos", choices=["auto", "always", "never"], default="auto",
                   help="prepend BOS: auto follows each tokenizer's default (default: auto)")
    p.add_argument("--topk", type=int, default=32, help="top-k tokens kept per position in the cache (default: 32)")
    p.add_argument("--no-cache", action="store_true", help="score without reading or writing the cache")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _contexts(args, models) -> list[tuple[str, int]]:
    """(name, context length) of each causal LM of ``models`` (loaded models or specs; specs of
    causal LMs are loaded, once per process) whose context is bounded."""
    from arfuse.adapters import head_of, load_model

    out = []
    for m in models:
        if isinstance(m, str):
            if head_of(m) != "causal":  # image classifiers and masked LMs read no windows
                continue
            m = load_model(m, device=args.device, dtype=args.dtype)
        limit = getattr(getattr(m, "info", None), "max_length", None)
        if limit is not None:
            out.append((m.info.name, int(limit)))
    return out


def score_config(args, models=()):
    """The ScoreConfig of the command's options, with the defaults resolved against ``models``
    (loaded models or specs): --window is DEFAULT_WINDOW capped at the shortest context among
    them, --stride half the window actually used. Explicit bad values fail here, naming the fix."""
    from arfuse.errors import ArfuseError
    from arfuse.scoring.scorer import ScoreConfig

    sliding = args.convention == "sliding"
    low = 2 if sliding else 1
    if args.window is not None:
        window, why = args.window, ""
        if window < low:
            raise ArfuseError(f"--window {window} is too small: give at least {low} tokens"
                              + (" with the sliding convention" if sliding else "")
                              + f" (or leave --window out for the default, {DEFAULT_WINDOW} capped at the models' "
                                "context)")
        ctx = _contexts(args, models) if models else []
        for name, limit in ctx:
            if window > limit:
                raise ArfuseError(f"--window {window} exceeds {name}'s context of {limit} tokens: use --window "
                                  f"{limit} or less (or leave --window out: the default fits the models)")
    else:
        ctx = _contexts(args, models) if models else []
        window = min([DEFAULT_WINDOW] + [c for _, c in ctx])
        short = [n for n, c in ctx if c == window]
        why = f" (the default window: {short[0]}'s context)" if short and window < DEFAULT_WINDOW \
            else " (the default window)"
        if window < low:
            raise ArfuseError(f"{short[0] if short else 'the model'} has a context of {window} token(s), too short "
                              "for the sliding convention: use --convention disjoint")
    if args.stride is None:
        stride = max(1, window // 2)
    else:
        stride = args.stride
        if sliding and not 1 <= stride <= window:
            raise ArfuseError(f"--stride {stride} must be between 1 and the window, {window}{why}: give "
                              f"--stride {max(1, window // 2)} (half the window), or leave --stride out"
                              + (", or a larger --window" if stride > window and args.window is not None
                                 and all(window < c for _, c in ctx) else ""))
    if args.topk < 1:
        raise ArfuseError(f"--topk {args.topk} must be at least 1: give e.g. --topk 32 (the default)")
    bs = getattr(args, "batch_size", 1)
    if bs is not None and bs < 1:
        raise ArfuseError(f"--batch-size {bs} must be at least 1: give e.g. --batch-size 4 (results do not "
                          "depend on it)")
    return ScoreConfig(window=window, stride=stride, convention=args.convention, bos=args.bos, topk=args.topk)


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


def add_scale_options(p: argparse.ArgumentParser) -> None:
    """--workers N and --ray-address: score the windows on a pool of Ray actors (arfuse.scoring.shards)."""
    g = p.add_argument_group("scale-out (Ray; docs/scale-out.md)")
    g.add_argument("--workers", type=int, metavar="N",
                   help="score the windows on N Ray actors, each holding the model once; the records and the cache "
                        "are the same as in one process (default: score in this process, without Ray)")
    g.add_argument("--ray-address", metavar="ADDR",
                   help="with --workers: the Ray cluster to use (HOST:6379, 'auto', or ray://HOST:10001; default: "
                        "start a local one)")
    g.add_argument("--worker-cpus", type=float, default=1.0, metavar="C",
                   help="with --workers: CPUs (and torch threads) per actor (default: 1)")
    g.add_argument("--worker-gpus", type=float, default=None, metavar="G",
                   help="with --workers: GPUs per actor (default: 1 when the model is on CUDA, else 0)")


def workers_from_args(args):
    """The ``arfuse.scoring.shards.Workers`` of the command's scale-out options, or None without --workers."""
    import importlib.util

    from arfuse.errors import ArfuseError

    n = getattr(args, "workers", None)
    if n is None:
        if getattr(args, "ray_address", None):
            raise ArfuseError(f"--ray-address {args.ray_address} needs --workers N (how many Ray actors score)")
        return None
    from arfuse.adapters.actor import INSTALL
    from arfuse.scoring.shards import Workers

    if importlib.util.find_spec("ray") is None:
        raise ArfuseError(f"--workers {n} needs Ray, which is not installed: {INSTALL} (or leave --workers out to "
                          "score in this process)")
    return Workers(n, address=args.ray_address, num_cpus=args.worker_cpus, num_gpus=args.worker_gpus)


ENGINES = ("auto", "llamacpp", "vllm")


def add_backend_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=ENGINES, default="auto",
                   help="the engine that scores every model: auto (the backend that recognises each model; a "
                        ".gguf file runs on transformers, whose batched forward scores fastest on a CPU), "
                        "llamacpp (GGUF files as they are; pip install -e '.[llamacpp]') or vllm (GPU, "
                        "prompt_logprobs; pip install -e '.[vllm]'); the same as writing ENGINE:MODEL for each")


def backend_spec(args, spec: str) -> str:
    """``spec`` as the chosen --backend loads it (``llamacpp:SPEC`` for --backend llamacpp)."""
    engine = getattr(args, "backend", "auto")
    if engine == "auto" or spec.startswith(f"{engine}:"):
        return spec
    return f"{engine}:{spec}"
