"""Data sets for perplexity: a name resolved in the shared data folder, a local file, or a
Hugging Face dataset, optionally sliced: ``kjv[90%:95%]``, ``wikitext2-raw-test[:200000]``.

Integer slice bounds are character offsets, exact. Percent bounds are fractions of the
characters, moved forward to the next line start so no line is cut in two.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from arfuse.errors import ArfuseError, did_you_mean
from arfuse.paths import shared_data_root

# name -> (path under the shared data folder, Hugging Face (dataset, config, split) fallback, what it is)
NAMED: dict[str, tuple[str, tuple | None, str]] = {
    "wikitext2-raw-test": ("text/wikitext-2/wiki.test.raw", ("wikitext", "wikitext-2-raw-v1", "test"), "WikiText-2 raw, test"),
    "wikitext2-test": ("text/wikitext-2/wiki.test.tokens", ("wikitext", "wikitext-2-v1", "test"), "WikiText-2 (tokenized), test"),
    "wikitext2-valid": ("text/wikitext-2/wiki.valid.tokens", ("wikitext", "wikitext-2-v1", "validation"), "WikiText-2 (tokenized), valid"),
    "ptb-test": ("text/ptb/ptb.test.txt", ("ptb_text_only", None, "test"), "Penn Treebank, test"),
    "ptb-valid": ("text/ptb/ptb.valid.txt", ("ptb_text_only", None, "validation"), "Penn Treebank, valid"),
    "tinyshakespeare": ("text/tinyshakespeare.txt", None, "Tiny Shakespeare"),
    "kjv": ("corpora/kjv.txt", None, "King James Bible"),
}

_SLICE = re.compile(r"^(?P<base>.*?)\[(?P<a>[^:\]]*):(?P<b>[^:\]]*)\]$")


@dataclass
class Dataset:
    name: str                       # the spec as given, slice included
    documents: list[str]
    source: str                     # where it was read from
    description: str = ""
    char_range: tuple[int, int] | None = None
    meta: dict = field(default_factory=dict)

    @property
    def content_hash(self) -> str:
        h = hashlib.sha256()
        for d in self.documents:
            b = d.encode()
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
        return h.hexdigest()

    @property
    def n_chars(self) -> int:
        return sum(len(d) for d in self.documents)


def _bound(tok: str, n: int, text: str, name: str) -> int:
    tok = tok.strip()
    if tok == "":
        return -1
    if tok.endswith("%"):
        try:
            frac = float(tok[:-1]) / 100
        except ValueError:
            raise ArfuseError(f"bad slice bound {tok!r} in {name!r}: use a character offset or a percentage like 90%") from None
        if not 0 <= frac <= 1:
            raise ArfuseError(f"slice bound {tok!r} in {name!r} is outside 0%..100%")
        pos = int(round(frac * n))
        if 0 < pos < n:  # snap to the next line start
            nl = text.find("\n", pos - 1)
            pos = n if nl < 0 else nl + 1
        return pos
    try:
        v = int(tok)
    except ValueError:
        raise ArfuseError(f"bad slice bound {tok!r} in {name!r}: use a character offset or a percentage like 90%") from None
    return max(0, min(n, v if v >= 0 else n + v))


def read_jsonl(path: str | Path):
    """(``path:line``, object) for every non-blank line of a JSON-lines file; a line that is not
    JSON fails with its place and the fix."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise ArfuseError(f"{where}: not valid JSON ({e.msg}): fix or remove that line") from None


def _read_file(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        docs = []
        for where, obj in read_jsonl(path):
            if not isinstance(obj, dict) or "text" not in obj:
                raise ArfuseError(f"{where}: each line needs a \"text\" field")
            docs.append(obj["text"])
        return docs
    if path.suffix == ".bz2":
        import bz2

        return [bz2.open(path, "rt", encoding="utf-8").read()]
    return [path.read_text(encoding="utf-8")]


def load_dataset(spec: str) -> Dataset:
    """Resolve a data spec (name or path, optional ``[a:b]`` character slice) to documents."""
    base, a_tok, b_tok = spec, None, None
    m = _SLICE.match(spec)
    if m and not Path(spec).exists():
        base, a_tok, b_tok = m["base"], m["a"], m["b"]
    path = Path(base).expanduser()
    description = ""
    if path.exists():
        if path.is_dir():
            raise ArfuseError(f"data {base} is a folder: give a text or .jsonl file")
        docs, source = _read_file(path), str(path.resolve())
    elif base in NAMED:
        rel, hf, description = NAMED[base]
        root = shared_data_root()
        if root is not None and (root / rel).exists():
            docs, source = _read_file(root / rel), str(root / rel)
        elif hf is not None:
            docs, source = _from_hub(base, hf), f"huggingface:{hf[0]}/{hf[1]}:{hf[2]}"
        else:
            raise ArfuseError(f"data {base!r} needs the shared data folder ({rel}): set ARFUSE_DATA to it")
    else:
        looks_like_path = "/" in base or "." in Path(base).name
        if looks_like_path:
            raise ArfuseError(f"data file {base} does not exist: check the path")
        raise ArfuseError(f"unknown data set {base!r}: use a file path or one of {', '.join(NAMED)}."
                          + did_you_mean(base, NAMED))
    char_range = None
    if a_tok is not None:
        if len(docs) != 1:
            raise ArfuseError(f"{spec!r}: a [a:b] slice applies to a single-document text, but {base} has {len(docs)} documents")
        text = docs[0]
        n = len(text)
        a = _bound(a_tok, n, text, spec)
        b = _bound(b_tok, n, text, spec)
        a = 0 if a < 0 else a
        b = n if b < 0 else b
        docs = [text[a:b]]
        char_range = (a, b)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ArfuseError(f"data {spec!r} is empty (no text to score): check the file or the slice")
    return Dataset(spec, docs, source, description, char_range)


def _from_hub(name: str, hf: tuple) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise ArfuseError(f"data {name!r} is not in the shared data folder and the `datasets` package is not installed: "
                          "pip install datasets (with internet), or set ARFUSE_DATA") from None
    ds = datasets.load_dataset(hf[0], hf[1], split=hf[2])
    col = "text" if "text" in ds.column_names else "sentence"
    return ["\n".join(ds[col])] if name.startswith("ptb") else ["".join(ds[col])]
