"""A training run's folder: checking that it holds this run (or nothing), the versions it
records, and the atomic export of the final model beside its checkpoints."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from arfuse.errors import ArfuseError
from arfuse.train import checkpoint as ckpt
from arfuse.train.config import TrainConfig
from arfuse.train.models import TrainModel, VocabMap, export_state_dict, full_vocab_num_parameters, hf_config


def _differences(a: dict, b: dict) -> list[str]:
    keys = sorted(set(a) | set(b))
    return [f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def check_run_folder(out: Path, cfg: TrainConfig) -> dict | None:
    """The existing run in ``out`` when it is this one; an error when it holds anything else."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise ArfuseError(f"--out {out} is a file: give a folder for the run")
    entries = [p for p in out.iterdir() if not p.name.startswith(".")]
    if not entries:
        return None
    meta = ckpt.read_meta(out)
    if meta is None or meta.get("format") != ckpt.FORMAT:
        raise ArfuseError(f"--out {out} already holds files that are not an arfuse training run "
                          f"({', '.join(sorted(p.name for p in entries)[:4])}...): nothing was overwritten; "
                          "choose another --out folder or empty this one")
    diff = _differences(meta.get("identity", {}), cfg.identity())
    if diff:
        raise ArfuseError(f"--out {out} holds a different run (it differs in {'; '.join(diff[:5])}): nothing was "
                          "overwritten; choose another --out folder, or delete this one to start over")
    return meta


def versions() -> dict:
    import transformers

    from arfuse.version import __version__ as arfuse_version

    return {"arfuse": arfuse_version, "torch": torch.__version__, "transformers": transformers.__version__}


def _atomic_export(out: Path, write_files) -> None:
    """Write the final model files to a temporary folder, then move each into ``out``."""
    tmp = out / f".export.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write_files(tmp)
    for p in sorted(tmp.iterdir()):
        p.replace(out / p.name)
    tmp.rmdir()


def export_model(out: Path, model: TrainModel, vmap: VocabMap, tokenizer, cfg: TrainConfig) -> int:
    """Write the final full-vocabulary model and its tokenizer into ``out``; return its parameter count."""
    sd = export_state_dict(model, vmap)

    def write(tmp: Path):
        if cfg.is_hf:
            from transformers import AutoModelForCausalLM

            full = AutoModelForCausalLM.from_config(hf_config(cfg, vmap.full_size, tokenizer))
            missing, unexpected = full.load_state_dict(sd, strict=False)
            if unexpected or [m for m in missing if "lm_head" not in m]:
                raise RuntimeError(f"export mismatch: missing {missing}, unexpected {unexpected}")
            full.tie_weights()
            from transformers.utils import logging as hf_logging

            bar = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # "Writing model shards" would clutter the log
            try:
                full.save_pretrained(str(tmp))
            finally:
                if bar:
                    hf_logging.enable_progress_bar()
        else:
            from safetensors.torch import save_file

            if cfg.tie_weights:
                sd.pop("decoder.weight", None)  # tied to encoder.weight; the loader re-ties it
            save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / "model.safetensors"))
        tokenizer.save(tmp)

    _atomic_export(out, write)
    return full_vocab_num_parameters(model, vmap)
