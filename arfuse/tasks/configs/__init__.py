"""Task definitions: small declarative TOML files, one per task, in this folder."""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from arfuse.errors import ArfuseError, did_you_mean

HERE = Path(__file__).resolve().parent
KINDS = ("lambada", "multiple_choice")
FORMATS = ("arc", "cbt")


@dataclass(frozen=True)
class TaskConfig:
    name: str
    kind: str
    description: str
    data: str                       # under the shared data folder, or a path
    format: str | None = None       # multiple choice: "arc" or "cbt"
    prompt: str = "{question}"
    choice: str = " {choice}"
    hub: tuple | None = None
    source: str = ""                # the config file
    extra: dict = field(default_factory=dict)


def available() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.toml"))


def load_task(spec: str) -> TaskConfig:
    """A task by name (a file in this folder) or by the path of a TOML file."""
    path = Path(spec)
    if not (path.suffix == ".toml" and path.exists()):
        path = HERE / f"{spec}.toml"
        if not path.exists():
            raise ArfuseError(f"unknown task {spec!r}: use one of {', '.join(available())} or a .toml file."
                              + did_you_mean(spec, available()))
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ArfuseError(f"task file {path} is not valid TOML ({e}): fix that line") from None
    known = {"name", "kind", "description", "data", "format", "prompt", "choice", "hub"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ArfuseError(f"task file {path}: unknown key {unknown[0]!r}: use only {', '.join(sorted(known))}."
                          + did_you_mean(unknown[0], known))
    for key in ("name", "kind", "data"):
        if key not in raw:
            raise ArfuseError(f"task file {path} has no {key!r}: every task needs name, kind and data")
    if raw["kind"] not in KINDS:
        raise ArfuseError(f"task file {path}: kind {raw['kind']!r} is not one of {', '.join(KINDS)}")
    if raw["kind"] == "multiple_choice" and raw.get("format") not in FORMATS:
        raise ArfuseError(f"task file {path}: a multiple-choice task needs format = one of {', '.join(FORMATS)}, "
                          f"got {raw.get('format')!r}")
    hub = tuple(raw["hub"]) if "hub" in raw else None
    return TaskConfig(name=raw["name"], kind=raw["kind"], description=raw.get("description", ""), data=raw["data"],
                      format=raw.get("format"), prompt=raw.get("prompt", "{question}"),
                      choice=raw.get("choice", " {choice}"), hub=hub, source=str(path))
