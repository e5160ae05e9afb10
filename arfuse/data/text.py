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
        if 0 < pos < n:  # snap to the next line start (none after it: the offset itself)
            nl = text.find("\n", pos - 1)
            pos = pos if nl < 0 else nl + 1
        return pos
    try:
        v = int(tok)
    except ValueError:
        raise ArfuseError(f"bad slice bound {tok!r} in {name!r}: use a character offset or a percentage like 90%") from None
    return max(0, min(n, v if v >= 0 else n + v))


def not_utf8_error(path: str | Path, data: bytes, *, what: str = "") -> ArfuseError:
    """The error for a file whose bytes ``data`` are not UTF-8: the file, the line and byte offset
    of the first bad bytes, those bytes, and the fix. ``what`` qualifies the offset (e.g. "of the
    decompressed text")."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        start, end = e.start, e.end
    else:  # not reached for bytes that failed to decode; kept total for callers
        return ArfuseError(f"{path}: cannot be read as UTF-8 text: convert it to UTF-8")
    line = data.count(b"\n", 0, start) + 1
    bad = data[start:min(end, start + 8)]
    where = f"{path}: not UTF-8 text: byte offset {start:,}{' ' + what if what else ''} (line {line:,}) holds {bad!r}"
    head = data[:8192]
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        fix = (f"it starts with a UTF-16 byte-order mark, so it is UTF-16 text: convert it to UTF-8, e.g. "
               f"iconv -f utf-16 -t utf-8 {path} > converted.txt")
    elif b"\x00" in head:
        fix = "it holds NUL bytes, so it looks like a binary file, not text: give a text or .jsonl file"
    else:
        fix = (f"convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8 {path} > converted.txt, with its real "
               "encoding after -f), or it is not a text file: give a text one")
    return ArfuseError(f"{where}: {fix}")


def read_text(path: str | Path) -> str:
    """A UTF-8 text file's text (newlines as ``open`` reads them); a file that is not UTF-8 fails
    with its name, the byte offset and the bad bytes (``not_utf8_error``)."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise not_utf8_error(path, path.read_bytes()) from None


def read_jsonl(path: str | Path):
    """(``path:line``, object) for every non-blank line of a JSON-lines file; a line that is not
    JSON, or a file that is not UTF-8, fails with its place and the fix."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        lines = enumerate(f, 1)
        while True:
            try:
                lineno, line = next(lines)
            except StopIteration:
                return
            except UnicodeDecodeError:
                raise not_utf8_error(path, path.read_bytes()) from None
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

        try:
            with bz2.open(path, "rt", encoding="utf-8") as f:
                return [f.read()]
        except UnicodeDecodeError:
            with bz2.open(path, "rb") as f:
                raise not_utf8_error(path, f.read(), what="of the decompressed text") from None
        except (OSError, EOFError) as e:
            raise ArfuseError(f"{path}: not a complete bzip2 file ({e}): re-download it, or decompress it "
                              "yourself and give the text file") from None
    return [read_text(path)]


def load_dataset(spec: str) -> Dataset:
    """Resolve a data spec (name or path, optional ``[a:b]`` character slice) to documents."""
    base, a_tok, b_tok = spec, None, None
    m = _SLICE.match(spec)
    if m and not Path(spec).exists():
        base, a_tok, b_tok = m["base"], m["a"], m["b"]
    elif not m and spec.endswith("]") and "[" in spec and not Path(spec).exists():
        head, tail = spec[:spec.rindex("[")], spec[spec.rindex("["):]
        if Path(head).expanduser().exists() or head in NAMED:
            raise ArfuseError(f"{spec!r}: the slice {tail!r} is malformed: give [a:b] with character offsets or "
                              f"percentages, either side may be empty, e.g. {head}[90%:95%] or {head}[:2000]")
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
