"""Protein masked language models: ESM-2 through transformers' ``EsmForMaskedLM``.

A hub id (``facebook/esm2_t6_8M_UR50D``), a short name (``esm2_8m`` ... ``esm2_15b``) or a
local folder with ``config.json`` (``model_type: esm``). Residues map to token ids one
character each; a character outside the model's alphabet is an error naming the record,
the position and the allowed letters. ``logprobs`` returns float32 log-softmax over the
vocabulary at every position. Masking lives in ``arfuse.data.fasta``, metrics in ``arfuse.tasks.masked_lm``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from arfuse.adapters.base import ModelInfo, file_sha256, fingerprint_json
from arfuse.errors import ArfuseError, did_you_mean

# the ESM-2 vocabulary (fair-esm's Alphabet "ESM-1b"), in id order
ESM2_VOCAB = ("<cls>", "<pad>", "<eos>", "<unk>", "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q",
              "N", "F", "Y", "M", "H", "W", "C", "X", "B", "U", "Z", "O", ".", "-", "<null_1>", "<mask>")

ESM2_HUB = {
    "esm2_8m": "facebook/esm2_t6_8M_UR50D",
    "esm2_35m": "facebook/esm2_t12_35M_UR50D",
    "esm2_150m": "facebook/esm2_t30_150M_UR50D",
    "esm2_650m": "facebook/esm2_t33_650M_UR50D",
    "esm2_3b": "facebook/esm2_t36_3B_UR50D",
    "esm2_15b": "facebook/esm2_t48_15B_UR50D",
}


class ProteinMLM:
    """An ESM-style masked LM: residues -> ids, ids -> float32 log-probs per position."""

    def __init__(self, spec: str, *, device: str = "cpu", name: str | None = None, revision: str | None = None):
        from transformers import EsmForMaskedLM

        from arfuse.adapters.hf import resolve_device

        self.device = resolve_device(device)
        load_from = ESM2_HUB.get(spec.lower(), spec)
        path = Path(load_from).expanduser()
        if path.exists():
            if not (path / "config.json").exists():
                raise ArfuseError(f"{spec} has no config.json: not a Hugging Face model folder (save one with "
                                  "EsmForMaskedLM.save_pretrained)")
            cfg = json.loads((path / "config.json").read_text())
            if cfg.get("model_type") != "esm":
                raise ArfuseError(f"{spec} is a {cfg.get('model_type')!r} model, not ESM: the protein masked-LM path "
                                  "needs an EsmForMaskedLM folder")
            load_from = str(path.resolve())
            weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
            identity: dict = {"path": load_from, "weights": {p.name: file_sha256(p) for p in weights},
                              "config": fingerprint_json((path / "config.json").read_text())}
        else:
            if spec.startswith((".", "/", "~")) or load_from.count("/") > 1:
                raise ArfuseError(f"model path {spec} does not exist: check the path")
            identity = {"spec": load_from, "revision": revision}
        try:
            self.model = EsmForMaskedLM.from_pretrained(load_from, revision=revision, dtype=torch.float32)
        except OSError as e:
            raise ArfuseError(f"cannot load ESM model {spec!r}: {str(e).splitlines()[0]} (without internet, pass a "
                              "local folder holding the model's config.json and weights)") from e
        if "weights" not in identity:
            identity["commit"] = getattr(self.model.config, "_commit_hash", None)
        self.model.to(self.device).eval()
        self.vocab = self._vocab(load_from, revision)
        self.token_to_id = {t: i for i, t in enumerate(self.vocab)}
        for tok in ("<cls>", "<eos>", "<pad>", "<mask>"):
            if tok not in self.token_to_id:
                raise ArfuseError(f"{spec}'s vocabulary has no {tok} token: not an ESM masked LM vocabulary")
        self.cls_id, self.eos_id = self.token_to_id["<cls>"], self.token_to_id["<eos>"]
        self.pad_id, self.mask_id = self.token_to_id["<pad>"], self.token_to_id["<mask>"]
        # residue letters: the one-character tokens (special tokens are all <...>)
        self.alphabet = {t: i for t, i in self.token_to_id.items() if len(t) == 1}
        self.special_ids = frozenset(i for t, i in self.token_to_id.items() if len(t) != 1)
        cfg = self.model.config
        max_pos = int(getattr(cfg, "max_position_embeddings", 1026))
        # absolute position embeddings are offset by the padding index; rotary ones are not bounded
        self.max_residues = max_pos - 2 - (cfg.pad_token_id + 1 if cfg.position_embedding_type == "absolute" else 0)
        vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        if vocab_size < len(self.vocab):
            raise ArfuseError(f"{spec}: the tokenizer has {len(self.vocab)} tokens but the model only {vocab_size} outputs")
        self.info = ModelInfo(name=name or (Path(spec).name if path.exists() else spec), kind="esm",
                              num_parameters=sum(p.numel() for p in self.model.parameters()),
                              vocab_size=vocab_size, max_length=self.max_residues + 2, identity=identity)

    @staticmethod
    def _vocab(load_from: str, revision: str | None) -> tuple[str, ...]:
        """The id-ordered vocabulary from the model's tokenizer (ESM-2's standard one when it has none)."""
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(load_from, revision=revision)
        except (OSError, ValueError):
            return ESM2_VOCAB
        v = tok.get_vocab()
        return tuple(t for t, _ in sorted(v.items(), key=lambda kv: kv[1]))

    def tokenizer_fingerprint(self) -> str:
        return fingerprint_json(list(self.vocab))

    def check_residues(self, seq: str, record: str) -> None:
        """Raise, naming the record and position, when ``seq`` holds a letter outside the alphabet."""
        bad = [(i, c) for i, c in enumerate(seq) if c not in self.alphabet]
        if bad:
            i, c = bad[0]
            hint = " (lowercase letters: uppercase the sequence)" if c.upper() in self.alphabet else ""
            hint = hint or (" ('*' marks a stop codon: strip it)" if c == "*" else "")
            chars = "".join(sorted({c for _, c in bad}))
            raise ArfuseError(f"FASTA record {record!r}: character {c!r} at residue {i + 1} (and {len(bad) - 1} more; "
                              f"all bad characters: {chars!r}) is outside {self.info.name}'s alphabet "
                              f"{''.join(self.alphabet)}{hint}: fix or remove the record")

    def encode(self, seq: str, record: str = "?") -> list[int]:
        """Token ids of a residue string, without special tokens."""
        self.check_residues(seq, record)
        return [self.alphabet[c] for c in seq]

    @torch.no_grad()
    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 log-softmax over the vocabulary at every position: (B, T) -> (B, T, V)."""
        am = None if attention_mask is None else attention_mask.to(self.device)
        logits = self.model(input_ids=input_ids.to(self.device), attention_mask=am).logits
        return torch.log_softmax(logits.float(), dim=-1)

    @property
    def num_parameters(self) -> int:
        return self.info.num_parameters


def is_protein_model(spec: str) -> bool:
    """Whether ``spec`` names an ESM masked LM (so ``arfuse eval`` runs the masked-LM task)."""
    s = spec.strip()
    if s.lower() in ESM2_HUB:
        return True
    p = Path(s).expanduser()
    if p.is_dir() and (p / "config.json").exists():
        try:
            return json.loads((p / "config.json").read_text()).get("model_type") == "esm"
        except (OSError, json.JSONDecodeError):
            return False
    return not p.exists() and s.count("/") == 1 and "esm" in s.lower() and not s.startswith((".", "/", "~"))


_LOADED: dict[tuple, ProteinMLM] = {}


def load_protein_model(spec: str, *, device: str = "cpu", reuse: bool = True) -> ProteinMLM:
    """An ESM masked LM from a short name, a hub id or a local folder (reused within a process)."""
    key = (spec, device)
    if reuse and key in _LOADED:
        return _LOADED[key]
    if spec.lower().startswith("esm") and "/" not in spec and spec.lower() not in ESM2_HUB and not Path(spec).exists():
        raise ArfuseError(f"unknown ESM-2 name {spec!r}: use one of {', '.join(ESM2_HUB)}, a hub id or a folder."
                          + did_you_mean(spec.lower(), ESM2_HUB))
    model = ProteinMLM(spec, device=device, name=spec if spec.lower() in ESM2_HUB else None)
    _LOADED[key] = model
    return model
