"""Training text: a named corpus or a local file, optionally sliced (``kjv[:90%]``), with a
validation slice held out; tokenised once into a cached array of token ids.

Names are those of ``arfuse.data.text`` (``kjv``, ``tinyshakespeare``, ...) plus ``enwiki``,
the Wikipedia XML sample in ../shared/data/corpora, whose markup mwparserfromhell strips to
article text (any ``.xml`` or ``.xml.bz2`` MediaWiki dump is read the same way).
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from arfuse.errors import ArfuseError
from arfuse.paths import cache_root, shared_data_root

WIKI_NAMES = {"enwiki": "corpora/enwiki-sample.xml.bz2"}
_SLICE = re.compile(r"^(?P<base>.*?)(?P<slice>\[[^:\]]*:[^:\]]*\])$")
# tags whose content is not article prose (citations, tables, galleries, formulas)
_DROP_TAGS = {"ref", "references", "table", "gallery", "math", "timeline", "imagemap", "score", "syntaxhighlight",
              "source", "templatedata", "chem", "hiero", "graph", "mapframe", "div", "noinclude"}
_DROP_LINK = re.compile(r"^\s*:?\s*(file|image|category|media|[a-z]{2,3}(-[a-z]+)?)\s*:", re.I)


@dataclass
class Corpus:
    """A text and where it came from."""

    spec: str
    text: str
    source: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def strip_wikitext(wikitext: str) -> str:
    """Article prose of one page's wikitext: templates, references, tables, files and categories
    dropped, links reduced to their text, headings kept as their own lines."""
    import mwparserfromhell

    code = mwparserfromhell.parse(wikitext)
    for tag in code.filter_tags(recursive=True):
        if str(tag.tag).strip().lower() in _DROP_TAGS or tag.wiki_markup == "{|":
            try:
                code.remove(tag)
            except ValueError:  # inside a node removed already
                pass
    for link in code.filter_wikilinks(recursive=True):
        if _DROP_LINK.match(str(link.title)):
            try:
                code.remove(link)
            except ValueError:
                pass
    text = code.strip_code(normalize=True, collapse=True)
    lines = [ln.strip() for ln in text.split("\n")]
    text = "\n".join(ln for ln in lines if ln)
    return re.sub(r"\n{2,}", "\n", text)


def wiki_xml_to_text(path: Path) -> str:
    """The main-namespace, non-redirect articles of a MediaWiki XML dump as plain text:
    ``= Title =`` then the article's prose, one blank line between articles."""
    import bz2
    import xml.etree.ElementTree as ET

    opener = bz2.open if path.suffix == ".bz2" else open
    articles = []
    with opener(path, "rb") as f:
        for _, el in ET.iterparse(f):
            if el.tag.rsplit("}", 1)[-1] != "page":
                continue
            ns, title = el.findtext("{*}ns"), el.findtext("{*}title")
            body = el.findtext("{*}revision/{*}text") or ""
            if ns == "0" and el.find("{*}redirect") is None and body.strip():
                prose = strip_wikitext(body)
                if prose:
                    articles.append(f"= {title} =\n{prose}\n")
            el.clear()
    if not articles:
        raise ArfuseError(f"{path} holds no main-namespace article: is it a MediaWiki XML export?")
    return "\n".join(articles)


def _wiki_cached_text(path: Path) -> Path:
    """The stripped text of a wiki dump, written once under the cache (parsing takes seconds)."""
    from arfuse.adapters.base import file_sha256

    out = cache_root() / "corpora" / f"{path.name.split('.')[0]}-{file_sha256(path)[:16]}.txt"
    if not out.exists():
        text = wiki_xml_to_text(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out)
    return out


def load_corpus(spec: str) -> Corpus:
    """Text of a corpus spec: a data-set name (kjv, tinyshakespeare, enwiki, ...) or a file, optionally sliced."""
    from arfuse.data.text import load_dataset

    m = _SLICE.match(spec)
    base, sl = (m["base"], m["slice"]) if m and not Path(spec).exists() else (spec, "")
    wiki = None
    if base in WIKI_NAMES:
        root = shared_data_root()
        if root is None or not (root / WIKI_NAMES[base]).exists():
            raise ArfuseError(f"corpus {base!r} is read from the shared data folder ({WIKI_NAMES[base]}), which is "
                              "missing: set ARFUSE_DATA, or give a text file")
        wiki = root / WIKI_NAMES[base]
    elif base.endswith((".xml", ".xml.bz2")) and Path(base).expanduser().is_file():
        wiki = Path(base).expanduser()
    if wiki is not None:
        ds = load_dataset(str(_wiki_cached_text(wiki)) + sl)
        source = f"{wiki.resolve()} (markup stripped by mwparserfromhell){' ' + sl if sl else ''}"
    else:
        ds = load_dataset(spec)
        source = ds.source + (f" {sl}" if sl else "")
    return Corpus(spec, "\n".join(ds.documents), source)


def split_valid(text: str, fraction: float) -> tuple[str, str]:
    """The text cut at the line start nearest to ``1 - fraction`` of it: (train, valid)."""
    if not 0 < fraction < 1:
        raise ArfuseError(f"valid_fraction {fraction} must be between 0 and 1 (e.g. 0.05), or give --valid")
    pos = int(len(text) * (1 - fraction))
    nl = text.find("\n", pos)
    cut = len(text) if nl < 0 else nl + 1
    return text[:cut], text[cut:]


def encode_cached(tokenizer, text: str) -> np.ndarray:
    """Token ids of ``text`` (int32), cached by tokenizer fingerprint and text hash."""
    key = hashlib.sha256((tokenizer.fingerprint + "\0").encode() + text.encode()).hexdigest()[:24]
    path = cache_root() / "train-tokens" / f"{key}.npy"
    if path.exists():
        try:
            return np.load(path)
        except (OSError, ValueError):
            pass  # a damaged file: encode again
    ids = np.asarray(tokenizer.encode(text), dtype=np.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npy")
    np.save(tmp, ids)
    tmp.replace(path)
    return ids
