"""Protein data: FASTA files (a name resolved in the shared data folder, or a path) and the
masking plan of masked-LM perplexity.

Masked positions depend only on the sequence and the seed (``mask_positions``), so every
model, and every batch size, sees the same masks.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from arfuse.data.text import read_text
from arfuse.errors import ArfuseError, did_you_mean
from arfuse.paths import shared_data_root

NAMED_FASTA: dict[str, tuple[str, str]] = {
    "uniref50-sample": ("protein/uniref50-sample.fasta", "15 UniRef50 protein sequences (facebookresearch/esm examples)"),
}


@dataclass
class FastaRecord:
    id: str
    description: str
    sequence: str


@dataclass
class ProteinDataset:
    name: str
    records: list[FastaRecord]
    source: str
    description: str = ""

    @property
    def content_hash(self) -> str:
        h = hashlib.sha256()
        for r in self.records:
            h.update(f"{r.id}\0{len(r.sequence)}\0{r.sequence}\0".encode())
        return h.hexdigest()

    @property
    def n_residues(self) -> int:
        return sum(len(r.sequence) for r in self.records)

    def summary(self) -> dict:
        return {"name": self.name, "source": self.source, "sequences": len(self.records),
                "residues": self.n_residues, "sha256": self.content_hash}


def read_fasta(path: str | Path) -> list[FastaRecord]:
    """Records of a FASTA file; sequence lines are joined, whitespace dropped, case kept."""
    path = Path(path)
    records: list[FastaRecord] = []
    cur: list[str] | None = None
    header = ""
    for lineno, line in enumerate(io.StringIO(read_text(path)), 1):   # lines split at "\n" only, as open() does
        line = line.strip()
        if not line or line.startswith(";"):
            continue
        if line.startswith(">"):
            if cur is not None:
                records.append(_record(header, cur, path))
            header, cur = line[1:].strip(), []
        elif cur is None:
            raise ArfuseError(f"{path}:{lineno}: sequence data before the first '>' header: "
                              "a FASTA file starts each record with a '>name' line")
        else:
            cur.append("".join(line.split()))
    if cur is not None:
        records.append(_record(header, cur, path))
    if not records:
        raise ArfuseError(f"{path} holds no FASTA record: each record is a '>name' line followed by its sequence")
    return records


def _record(header: str, lines: list[str], path: Path) -> FastaRecord:
    rid, _, desc = header.partition(" ")
    seq = "".join(lines)
    if not seq:
        raise ArfuseError(f"{path}: FASTA record {rid or header!r} has an empty sequence: remove it or add its residues")
    return FastaRecord(rid or f"record{len(lines)}", desc, seq)


def load_protein_dataset(spec: str) -> ProteinDataset:
    """FASTA records from a name (``uniref50-sample``) or a path."""
    p = Path(spec).expanduser()
    if p.exists():
        if p.is_dir():
            raise ArfuseError(f"data {spec} is a folder: give a FASTA file")
        return ProteinDataset(spec, read_fasta(p), str(p.resolve()))
    if spec in NAMED_FASTA:
        rel, desc = NAMED_FASTA[spec]
        root = shared_data_root()
        if root is None or not (root / rel).exists():
            raise ArfuseError(f"data {spec!r} needs the shared data folder ({rel}): set ARFUSE_DATA, or give a FASTA file")
        return ProteinDataset(spec, read_fasta(root / rel), str((root / rel).resolve()), desc)
    if "/" in spec or "." in p.name:
        raise ArfuseError(f"FASTA file {spec} does not exist: check the path")
    raise ArfuseError(f"unknown protein data set {spec!r}: give a FASTA file or one of {', '.join(NAMED_FASTA)}."
                      + did_you_mean(spec, NAMED_FASTA))


@dataclass(frozen=True)
class MaskConfig:
    """Everything that decides which positions are scored, besides the data."""

    rate: float = 0.15
    seed: int = 0
    max_residues: int = 1022   # residues per crop (ESM-2 was trained on crops of 1,022 + 2 specials)

    def __post_init__(self):
        if not 0.0 < self.rate <= 1.0:
            raise ArfuseError(f"mask rate {self.rate} is outside (0, 1]: use e.g. 0.15 for 15% of the residues")
        if self.max_residues < 1:
            raise ArfuseError(f"max_residues {self.max_residues} must be at least 1")

    def describe(self) -> str:
        return (f"{self.rate:.0%} of residues masked (seed {self.seed}), crops of at most {self.max_residues} "
                "residues; specials never masked")


def mask_positions(sequence: str, rate: float = 0.15, seed: int = 0) -> np.ndarray:
    """Sorted residue indices to mask: round(rate * L) of them (at least one), drawn without
    replacement by a generator seeded with ``seed`` and the sequence itself, so the masks do
    not depend on the record's position in the file, the model or the batch."""
    n = len(sequence)
    k = min(n, max(1, int(round(rate * n))))
    digest = int.from_bytes(hashlib.sha256(sequence.encode()).digest()[:8], "little")
    rng = np.random.default_rng([seed, digest])
    return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)
