"""A model zoo: one TOML recipe, one command, every model built deterministically in turn.

    [zoo]
    out = "runs/zoo"                 # model NAME goes to runs/zoo/NAME
    [defaults]                       # options every entry starts from
    threads = 1
    [[model]]
    name = "kjv-smollm2-2l"          # options of one model (any `arfuse train` option),
    config = "kjv-slm.toml"          # optionally on top of a config file beside the recipe
    ...
    [[model]]
    name = "word-{arch}-e{embed_size}"
    arch = ["lstm", "gru"]           # a list sweeps: one model per combination,
    embed_size = [16, 128]           # the name formatted with the values

Finished models are skipped, an interrupted one resumes; a progress bar over the zoo's
training tokens shows the rate and the time left.
"""
from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

from arfuse.errors import ArfuseError
from arfuse.train.config import TrainConfig, check_keys, load_toml


@dataclass
class ZooEntry:
    name: str
    config: TrainConfig


def expand(spec: dict, where: str) -> list[dict]:
    """One option dict per combination of the list-valued options of ``spec``."""
    sweep = {k: v for k, v in spec.items() if isinstance(v, list)}
    fixed = {k: v for k, v in spec.items() if not isinstance(v, list)}
    for k, v in sweep.items():
        if not v:
            raise ArfuseError(f"{where}: option {k!r} sweeps an empty list: give at least one value")
    combos = itertools.product(*sweep.values()) if sweep else [()]
    return [{**fixed, **dict(zip(sweep, values))} for values in combos]


def read_zoo(path: str | Path, *, overrides: dict | None = None) -> list[ZooEntry]:
    """The zoo's entries, each a validated config with its output folder set."""
    path = Path(path)
    if not path.is_file():
        raise ArfuseError(f"zoo recipe {path} does not exist: check the path (e.g. configs/zoo.toml)")
    doc = load_toml(path)
    unknown = set(doc) - {"zoo", "defaults", "model"}
    if unknown:
        raise ArfuseError(f"{path}: unknown table(s) {', '.join(sorted(unknown))}: use [zoo], [defaults] and [[model]]")
    out_root = Path(doc.get("zoo", {}).get("out", "runs/zoo"))
    if not out_root.is_absolute():
        out_root = Path.cwd() / out_root
    defaults = doc.get("defaults", {})
    check_keys(defaults, where=f"{path} [defaults]")
    models = doc.get("model", [])
    if not models:
        raise ArfuseError(f"{path} defines no [[model]] entry")
    entries: list[ZooEntry] = []
    seen: dict[str, int] = {}
    for i, m in enumerate(models, 1):
        where = f"{path} [[model]] #{i}"
        if "name" not in m:
            raise ArfuseError(f"{where} has no name: give name = \"...\" (it names the output folder)")
        opts = {k: v for k, v in m.items() if k not in ("name", "config")}
        if "config" in m:  # a config file (relative to the zoo recipe) under the entry's own options
            from arfuse.train.config import read_config_file

            base = read_config_file(path.parent / m["config"])
            check_keys(base, where=str(path.parent / m["config"]))
            opts = {**base, **opts}
        check_keys(opts, where=where)
        for combo in expand(opts, where):
            try:
                name = m["name"].format(**combo)
            except KeyError as e:
                raise ArfuseError(f"{where}: name {m['name']!r} uses {e} which the entry does not set") from None
            if name in seen:
                raise ArfuseError(f"{where}: two models are named {name!r}: put the swept options in the name, "
                                  "e.g. name = \"word-{arch}-e{embed_size}\"")
            seen[name] = i
            cfg = TrainConfig.resolve({**defaults, **combo, **(overrides or {}), "out": str(out_root / name)})
            entries.append(ZooEntry(name, cfg))
    return entries


def _select(entries: list[ZooEntry], only: list[str] | None) -> list[ZooEntry]:
    if not only:
        return entries
    names = {e.name for e in entries}
    for o in only:
        if o not in names:
            from arfuse.errors import did_you_mean

            raise ArfuseError(f"--only {o!r}: no such entry in the zoo." + did_you_mean(o, names))
    return [e for e in entries if e.name in only]


def planned_tokens(cfg: TrainConfig) -> int:
    """Training tokens of a run (tokenises the data when the run is set in epochs; cached)."""
    per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
    if cfg.max_steps:
        return cfg.max_steps * per_step
    from arfuse.train.batches import Batches
    from arfuse.train.trainer import prepare

    import torch

    prep = prepare(cfg)
    n = len(prep.train_ids)
    b = Batches(torch.zeros(n, dtype=torch.long), cfg.batch_size, cfg.block_size, cfg.sampling, cfg.seed)
    return max(1, int(cfg.epochs * b.per_epoch / cfg.grad_accum)) * per_step


def _status(cfg: TrainConfig) -> tuple[str, dict | None]:
    from arfuse.train.checkpoint import list_checkpoints, read_meta

    meta = read_meta(Path(cfg.out))
    if meta is None:
        return "to train", None
    if meta.get("status") == "complete":
        return "done", meta
    last = list_checkpoints(Path(cfg.out))
    return (f"resumes at step {int(last[-1].name[5:]):,}" if last else "to train"), meta


def list_zoo(path: str | Path, *, only: list[str] | None = None) -> None:
    for e in _select(read_zoo(path), only):
        status, meta = _status(e.config)
        c = e.config
        extra = f"val ppl {meta['val_ppl']:.2f}" if meta and meta.get("status") == "complete" else ""
        print(f"{e.name:32s} {c.arch:17s} {c.tokenizer:14s} {c.data:22s} {status:18s} {extra}")


def build_zoo(path: str | Path, *, only: list[str] | None = None, overrides: dict | None = None,
              progress: bool | None = None, log=print) -> list[dict]:
    """Train every entry not finished yet, in order; returns one summary per entry."""
    import sys

    from arfuse.progress import token_progress
    from arfuse.train.trainer import train

    entries = _select(read_zoo(path, overrides=overrides), only)
    plan = []
    for e in entries:
        status, _ = _status(e.config)
        plan.append((e, status, 0 if status == "done" else planned_tokens(e.config)))
    total = sum(t for _, _, t in plan)
    log(f"zoo {path}: {len(plan)} models, {sum(s != 'done' for _, s, _ in plan)} to train, "
        f"{total:,} training tokens")
    results = []
    use_bar = sys.stderr.isatty() if progress is None else progress
    t_zoo = time.time()
    with token_progress(f"zoo {Path(path).name}", max(total, 1), enabled=use_bar) as advance:
        for e, status, tokens in plan:
            t0 = time.time()
            log(f"[{e.name}] {status}")
            res = train(e.config, progress=False, log=lambda msg, _n=e.name: log(f"[{_n}] {msg}"))
            advance(tokens)
            results.append({"name": e.name, "out": str(res.path), "arch": e.config.arch,
                            "tokenizer": e.config.tokenizer, "data": e.config.data,
                            "num_parameters": res.num_parameters, "steps": res.step, "val_loss": res.val_loss,
                            "val_ppl": res.val_ppl, "seconds": round(time.time() - t0, 1),
                            "already_done": res.already_done})
    elapsed = time.time() - t_zoo
    log(f"zoo done in {elapsed / 60:.1f} min")
    summary = Path(entries[0].config.out).parent / "zoo.json"
    summary.parent.mkdir(parents=True, exist_ok=True)
    prev = json.loads(summary.read_text()) if summary.exists() else {}
    prev.update({r["name"]: r for r in results if not (r["already_done"] and r["name"] in prev)})
    summary.write_text(json.dumps(prev, indent=2) + "\n")
    return results
