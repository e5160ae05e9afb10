"""Tokenizers for training: a word-level vocabulary built from the training text (the
paper's 5.3), or any Hugging Face tokenizer (a hub id, a folder, a tokenizer.json, the
tokenizer inside a GGUF file, GPT-2's and GPT-NeoX's files in ../shared/data/tokenizers).

Every tokenizer is a ``PreTrainedTokenizerFast`` so that it saves to ``tokenizer.json``
beside the weights and loads back with ``AutoTokenizer`` (character offsets included):
a trained model then scores through the same adapters as any other.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from arfuse.errors import ArfuseError, did_you_mean
from arfuse.paths import cache_root, shared_data_root

UNK, EOS = "<unk>", "<eos>"
# names resolved in the shared data folder (../shared/data/tokenizers)
SHARED = {"gpt2": "tokenizers/gpt2", "gpt-neox": "tokenizers/gpt-neox", "pythia": "tokenizers/gpt-neox"}
SPECIAL_NAMES = ("word", *SHARED)


@dataclass
class TrainTokenizer:
    """A fast tokenizer, what it was made from, and the hash that identifies its tokenization."""

    hf: object                 # transformers PreTrainedTokenizerFast
    spec: str                  # as given: "word", "gpt2", "smollm2-135m", a path, a hub id
    kind: str                  # "word", "shared", "gguf", "file", "folder", "hub"
    fingerprint: str           # equal to the HF adapter's tokenizer_fingerprint() of the saved model

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def save(self, folder: Path) -> None:
        self.hf.save_pretrained(str(folder))

    def describe(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "vocab_size": self.vocab_size, "fingerprint": self.fingerprint,
                "bos": self.hf.bos_token, "eos": self.hf.eos_token}


def _wrap(backend, spec: str, kind: str, **special) -> TrainTokenizer:
    from transformers import PreTrainedTokenizerFast

    tok = backend if not hasattr(backend, "to_str") else PreTrainedTokenizerFast(tokenizer_object=backend, **special)
    return TrainTokenizer(tok, spec, kind, fingerprint_of(tok))


def fingerprint_of(hf_tok) -> str:
    """The same hash as ``HFCausalLM.tokenizer_fingerprint`` computes for a model folder."""
    from arfuse.adapters.base import backend_fingerprint

    return backend_fingerprint(hf_tok.backend_tokenizer)


# ---- word level (the paper's 5.3) --------------------------------------------------------
def _word_backend(vocab: dict[str, int]):
    """Words split on whitespace, each line end read as <eos>, unknown words as <unk>."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # the normaliser keeps character alignments, so offsets still point into the raw text
    tok.normalizer = normalizers.Replace(Regex(r"\n"), f" {EOS} ")
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return tok


def count_words(text: str) -> Counter:
    """Word counts as the word-level tokenizer splits the text (line ends count as <eos>)."""
    counts: Counter = Counter()
    for line in text.split("\n"):
        counts.update(line.split())
    counts[EOS] += text.count("\n")
    return counts


def build_word_tokenizer(text: str, *, max_vocab: int = 10_000, min_freq: int = 2) -> TrainTokenizer:
    """The paper's 5.3 vocabulary: the most frequent words of the training text (ties in order
    of first appearance), at most ``max_vocab`` including <unk> and <eos>, each seen ``min_freq`` times."""
    if max_vocab < 3:
        raise ArfuseError(f"max_vocab {max_vocab} leaves no room for words besides <unk> and <eos>: use at least 3")
    counts = count_words(text)
    vocab = {UNK: 0, EOS: 1}
    for word, c in counts.most_common():  # stable: equal counts keep first-appearance order
        if len(vocab) >= max_vocab or c < min_freq:
            break
        if word not in vocab:
            vocab[word] = len(vocab)
    if len(vocab) <= 2:
        raise ArfuseError(f"no word of the training text occurs {min_freq} times: lower min_freq or give more text")
    return _wrap(_word_backend(vocab), "word", "word", unk_token=UNK, eos_token=EOS)


# ---- Hugging Face tokenizers --------------------------------------------------------------
def _gpt2_from_files(folder: Path, spec: str) -> TrainTokenizer:
    """GPT-2's byte-level BPE from encoder.json (vocab.json) and vocab.bpe (merges.txt)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = next((folder / n for n in ("vocab.json", "encoder.json") if (folder / n).exists()), None)
    merges = next((folder / n for n in ("merges.txt", "vocab.bpe") if (folder / n).exists()), None)
    if vocab is None or merges is None:
        raise ArfuseError(f"{folder} lacks GPT-2's vocab.json/encoder.json and merges.txt/vocab.bpe: check the folder")
    tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    eot = "<|endoftext|>"
    tok.add_special_tokens([eot])
    return _wrap(tok, spec, "shared" if spec in SHARED else "folder", bos_token=eot, eos_token=eot, unk_token=eot)


def _from_tokenizer_json(path: Path, spec: str, kind: str) -> TrainTokenizer:
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(path))
    special = {}
    if backend.token_to_id("<|endoftext|>") is not None:  # GPT-NeoX, Pythia
        special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    return _wrap(backend, spec, kind, **special)


def _gguf_tokenizer(path: Path, spec: str) -> TrainTokenizer:
    """The tokenizer inside a GGUF file, converted once and kept under the cache."""
    from transformers import AutoTokenizer

    from arfuse.adapters.base import file_sha256

    folder = cache_root() / "tokenizers" / ("gguf-" + file_sha256(path)[:24])
    if not (folder / "tokenizer.json").exists():
        from arfuse.adapters.hf import load_hf_tokenizer

        tok = load_hf_tokenizer(str(path))
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        tok.save_pretrained(str(tmp))
        folder.parent.mkdir(parents=True, exist_ok=True)
        if not folder.exists():
            tmp.replace(folder)
    return _wrap(AutoTokenizer.from_pretrained(str(folder)), spec, "gguf")


def load_tokenizer(spec: str, *, text: str | None = None, max_vocab: int = 10_000, min_freq: int = 2) -> TrainTokenizer:
    """A training tokenizer from a spec; ``text`` is the training text a word vocabulary is built from."""
    from arfuse.adapters.aliases import ALIASES, resolve_alias

    if spec == "word":
        if text is None:
            raise ArfuseError("the word-level tokenizer is built from the training text: give --data")
        return build_word_tokenizer(text, max_vocab=max_vocab, min_freq=min_freq)
    if spec in SHARED:
        root = shared_data_root()
        folder = root / SHARED[spec] if root else None
        if folder is None or not folder.is_dir():
            raise ArfuseError(f"tokenizer {spec!r} is read from the shared data folder ({SHARED[spec]}), which is "
                              "missing: set ARFUSE_DATA, or give a tokenizer folder or hub id")
        if (folder / "tokenizer.json").exists():
            return _from_tokenizer_json(folder / "tokenizer.json", spec, "shared")
        return _gpt2_from_files(folder, spec)
    alias = resolve_alias(spec) if spec.lower() in ALIASES else None
    path = Path(alias or spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ArfuseError(f"GGUF file {spec} does not exist: check the path")
        return _gguf_tokenizer(path, spec)
    if path.suffix == ".bin" and path.is_file():
        raise ArfuseError(f"{spec} is a llama2.c file: arfuse trains on Hugging Face tokenizers; give a tokenizer.json, "
                          "a folder, a .gguf file, a hub id, or 'word'")
    if path.is_file():
        if path.name.endswith(".json"):
            return _from_tokenizer_json(path, spec, "file")
        raise ArfuseError(f"{spec} is not a tokenizer: give a tokenizer.json, a .gguf file, a folder, a hub id, or 'word'")
    if path.is_dir():
        if (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists():
            from transformers import AutoTokenizer

            try:
                tok = AutoTokenizer.from_pretrained(str(path))
            except (OSError, ValueError) as e:
                raise ArfuseError(f"cannot load the tokenizer in {spec}: {str(e).splitlines()[0]}") from e
            if not getattr(tok, "is_fast", False):
                raise ArfuseError(f"{spec} holds a slow tokenizer: arfuse needs a fast one (a tokenizer.json)")
            return _wrap(tok, spec, "folder")
        if any((path / n).exists() for n in ("encoder.json", "vocab.json")):
            return _gpt2_from_files(path, spec)
        raise ArfuseError(f"tokenizer folder {spec} holds no tokenizer.json, tokenizer_config.json or GPT-2 vocab files")
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "." in Path(spec).name
    if looks_like_path:
        raise ArfuseError(f"tokenizer {spec} does not exist: check the path (a .gguf file, a tokenizer.json or a "
                          "tokenizer folder)")
    known = [*SPECIAL_NAMES, *ALIASES]
    if "/" not in spec:
        raise ArfuseError(f"unknown tokenizer {spec!r}: use one of {', '.join(known)}, a .gguf file, a tokenizer.json, "
                          "a tokenizer folder or a Hugging Face hub id (owner/name)." + did_you_mean(spec, known))
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as e:
        raise ArfuseError(f"tokenizer {spec!r} not found locally or on the hub ({str(e).splitlines()[0]}): "
                          "without internet, give a local folder, a tokenizer.json or a .gguf file") from e
    return _wrap(tok, spec, "hub")
