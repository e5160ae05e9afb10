"""Data loaders of arfuse's local lm-eval tasks: the shared data folder (``../shared/data`` or
$ARFUSE_DATA), read offline, never the hub. lm-eval imports this file by path (``!function``).

``arfuse_wikitext`` takes two task metadata keys (``--metadata '{"wikitext_data": ...}'``):
``wikitext_data``, an arfuse data spec (a path, optionally sliced by characters:
``.../wiki.test.raw[:200000]``; default the whole WikiText-2 raw test file), and
``wikitext_documents``: ``articles`` (default: one document per article, cut at its `` = Title = ``
heading, as lm-eval's wikitext_document_level) or ``one`` (the text as a single document).
"""
from __future__ import annotations

import re

HEADING = re.compile(r"^ = [^=].* = $")


def _path(rel: str) -> str:
    from arfuse.errors import ArfuseError
    from arfuse.paths import shared_data_root

    root = shared_data_root()
    if root is None or not (root / rel).exists():
        raise ArfuseError(f"arfuse's local lm-eval tasks read {rel} from the shared data folder, which is not "
                          "here: set ARFUSE_DATA=<folder holding it> (see ../shared/data/README.md)")
    return str(root / rel)


def _one_split(rows: dict):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)})


def articles(text: str) -> list[str]:
    """The articles of a WikiText raw text, each from its top-level heading line to the next."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if HEADING.match(line.rstrip("\n"))]
    if not starts:
        return [text]
    # the blank line before a heading belongs to the article it opens
    cuts = [0] + [max(s - 1, 0) for s in starts[1:]] + [len(lines)]
    return ["".join(lines[a:b]) for a, b in zip(cuts, cuts[1:]) if "".join(lines[a:b]).strip()]


def wikitext(wikitext_data: str | None = None, wikitext_documents: str = "articles", **_):
    from arfuse.data.text import load_dataset
    from arfuse.errors import ArfuseError

    spec = wikitext_data or _path("text/wikitext-2/wiki.test.raw")
    docs = load_dataset(spec).documents   # the very text `arfuse score SPEC` reads
    if wikitext_documents == "articles":
        docs = [a for d in docs for a in articles(d)]
    elif wikitext_documents != "one":
        raise ArfuseError(f"wikitext_documents {wikitext_documents!r}: use 'articles' or 'one'")
    return _one_split({"page": docs})


def wikitext_results(doc, results):
    """Word and byte counts of the scored text itself (lm-eval's wikitext counts them on the text before
    its detokenizer; here nothing is detokenized): words are runs of non-space characters, as arfuse counts."""
    (loglikelihood,) = results
    words = len(doc["page"].split())
    nbytes = len(doc["page"].encode("utf-8", "surrogatepass"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, nbytes),
            "bits_per_byte": (loglikelihood, nbytes)}


def _jsonl(rel: str):
    import datasets

    return datasets.load_dataset("json", data_files={"test": _path(rel)})


def lambada(**_):
    return _jsonl("text/lambada/lambada_test.jsonl")


def arc_easy(**_):
    return _jsonl("mc/arc/ARC-Easy-Test.jsonl")


def arc_challenge(**_):
    return _jsonl("mc/arc/ARC-Challenge-Test.jsonl")
