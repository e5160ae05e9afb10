"""Self-describing, resumable checkpoints in safetensors plus JSON.

A run folder holds:

    arfuse.json                 what the run is (architecture, tokenizer, config, data hashes),
                                its status ("training" or "complete"), step and validation loss
    tokenizer.json, ...         the tokenizer, saved with save_pretrained
    config.json, model.safetensors        the final model (a Hugging Face folder for transformers;
                                safetensors + arfuse.json for LSTM/GRU), written when training ends
    train_log.jsonl             wall-clock times per validation (the only non-deterministic file)
    checkpoints/step-00000100/  model.safetensors (the trained, compact-vocabulary module),
                                optimizer.safetensors, state.safetensors (RNG and RNN state),
                                state.json (step, loss history, optimizer hyperparameters)

Every file is written to a temporary name and renamed, and a checkpoint folder appears
only once complete, so ``kill -9`` at any moment leaves the last checkpoint usable.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT = "arfuse-train/1"
META = "arfuse.json"


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def read_meta(folder: Path) -> dict | None:
    p = Path(folder) / META
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


def _flat_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {}
    scalars: dict = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v.detach().contiguous()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflat_optimizer(tensors: dict[str, torch.Tensor], info: dict) -> dict:
    state: dict = {}
    for key, v in tensors.items():
        _, idx, k = key.split(".", 2)
        state.setdefault(int(idx), {})[k] = v
    for idx, d in info.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(d)
    return {"state": state, "param_groups": info["param_groups"]}


def checkpoint_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def save_checkpoint(run: Path, step: int, module: torch.nn.Module, opt: torch.optim.Optimizer,
                    tensors: dict[str, torch.Tensor], state: dict, keep: int) -> Path:
    """Write checkpoint ``step`` atomically (a folder renamed into place) and prune older ones."""
    from safetensors.torch import save_model

    final = checkpoint_dir(run, step)
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_model(module, str(tmp / "model.safetensors"))
    opt_tensors, opt_info = _flat_optimizer(opt)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "optimizer": opt_info, **state}, indent=1))
    if final.exists():  # the same step again (a rerun that crashed after renaming): the same content
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(run)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (half-written ``.tmp`` folders are ignored)."""
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and ".tmp" not in p.name
            and (p / "state.json").exists()]
    return sorted(done, key=lambda p: p.name)


def clean_partial(run: Path) -> None:
    root = run / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            if ".tmp" in p.name:
                shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path, module: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Restore module and optimizer in place; return (extra tensors, state dict)."""
    from safetensors.torch import load_model

    load_model(module, str(path / "model.safetensors"))
    state = json.loads((path / "state.json").read_text())
    opt.load_state_dict(_unflat_optimizer(load_file(str(path / "optimizer.safetensors")), state.pop("optimizer")))
    return load_file(str(path / "state.safetensors")), state
