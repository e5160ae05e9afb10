"""The training loop: one loop with small named helpers (``get_batch``, ``get_lr``,
``estimate_loss``), deterministic for a seed, resumable from its last checkpoint.

Determinism: the weights are initialised after ``torch.manual_seed(seed)``; the batch order
is a function of (seed, epoch) alone; the torch RNG state (dropout) and an RNN's carried
state are checkpointed. A resumed run therefore takes exactly the steps an uninterrupted
one takes, and the same seed and data give a bit-identical checkpoint on the same machine
and thread count.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from arfuse.adapters.base import fingerprint_json
from arfuse.errors import ArfuseError
from arfuse.train import checkpoint as ckpt
from arfuse.train.config import TrainConfig
from arfuse.train.corpus import encode_cached, load_corpus, split_valid
from arfuse.train.models import (TrainModel, VocabMap, export_state_dict, full_vocab_num_parameters, hf_config,
                                 rnn_config)
from arfuse.train.tokenizers import TrainTokenizer, load_tokenizer


@dataclass
class TrainResult:
    """What a finished run reports."""

    path: Path
    step: int
    total_steps: int
    val_loss: float
    num_parameters: int
    seconds: float                  # wall time of this invocation (0 when nothing was left to do)
    resumed_from: int = 0           # the step a resumed run started from
    already_done: bool = False
    meta: dict = field(default_factory=dict)
    step_seconds: float = 0.0       # time spent in optimiser steps only (no validation, no checkpoints)
    tokens: int = 0                 # training tokens processed by this invocation

    @property
    def val_ppl(self) -> float:
        return math.exp(self.val_loss)


@dataclass
class Prepared:
    """Tokenizer and token streams of a run, with what identifies them."""

    tokenizer: TrainTokenizer
    train_ids: np.ndarray       # full-vocabulary ids
    valid_ids: np.ndarray
    data: dict                  # specs, sources, hashes, token counts


def prepare(cfg: TrainConfig) -> Prepared:
    """Read the corpus, hold out the validation text, build or load the tokenizer, tokenise."""
    corpus = load_corpus(cfg.data)
    if cfg.valid:
        train_text, valid_corpus = corpus.text, load_corpus(cfg.valid)
        valid_text, valid_desc = valid_corpus.text, {"spec": cfg.valid, "source": valid_corpus.source}
    else:
        train_text, valid_text = split_valid(corpus.text, cfg.valid_fraction)
        valid_desc = {"spec": f"last {cfg.valid_fraction:.0%} of {cfg.data} (by lines)", "source": corpus.source}
    if not train_text.strip():
        raise ArfuseError(f"training text {cfg.data!r} is empty: check the file or the slice")
    tok = load_tokenizer(cfg.tokenizer, text=train_text, max_vocab=cfg.max_vocab, min_freq=cfg.min_freq)
    train_ids, valid_ids = encode_cached(tok, train_text), encode_cached(tok, valid_text)
    import hashlib

    data = {
        "train": {"spec": cfg.data, "source": corpus.source, "chars": len(train_text), "tokens": int(len(train_ids)),
                  "sha256": hashlib.sha256(train_text.encode()).hexdigest()},
        "valid": {**valid_desc, "chars": len(valid_text), "tokens": int(len(valid_ids)),
                  "sha256": hashlib.sha256(valid_text.encode()).hexdigest()},
    }
    return Prepared(tok, train_ids, valid_ids, data)


def run_id(cfg: TrainConfig, prep: Prepared) -> str:
    """The hash of everything that determines the trained weights."""
    return fingerprint_json({"config": cfg.identity(), "tokenizer": prep.tokenizer.fingerprint,
                             "train": prep.data["train"]["sha256"], "valid": prep.data["valid"]["sha256"]})


# ---- batches -------------------------------------------------------------------------------
class Batches:
    """Micro-batch ``i`` of the run as a pure function of (seed, i): resumable anywhere.

    random: each epoch cuts the stream into blocks of ``T`` tokens at a random offset and
    visits them in a random order. sequential: the stream is cut into ``B`` columns read
    ``T`` tokens at a time (word_language_model's batchify), the RNN state carried along.
    """

    def __init__(self, ids: torch.Tensor, batch_size: int, block: int, sampling: str, seed: int):
        self.ids, self.B, self.T, self.sampling, self.seed = ids, batch_size, block, sampling, seed
        n = len(ids)
        if sampling == "random":
            self.n_blocks = (n - 1) // block
            self.per_epoch = self.n_blocks // batch_size
            self._epoch, self._perm, self._offset = -1, None, 0
        else:
            self.col_len = n // batch_size
            self.cols = ids[: batch_size * self.col_len].view(batch_size, self.col_len)  # (B, n/B)
            self.per_epoch = math.ceil((self.col_len - 1) / block) if self.col_len > 1 else 0

    def get_batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(x, y, starts_epoch) of micro-batch ``i``: (B, T) inputs and next-token targets."""
        epoch, j = divmod(i, self.per_epoch)
        if self.sampling == "sequential":
            a = j * self.T
            t = min(self.T, self.col_len - 1 - a)
            return self.cols[:, a:a + t], self.cols[:, a + 1:a + 1 + t], j == 0
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            slack = (len(self.ids) - 1) - self.n_blocks * self.T
            self._offset = int(rng.integers(0, slack + 1))
            self._perm = rng.permutation(self.n_blocks)
            self._epoch = epoch
        starts = self._offset + self._perm[j * self.B:(j + 1) * self.B] * self.T
        idx = torch.as_tensor(starts)[:, None] + torch.arange(self.T + 1)  # (B, T+1)
        chunk = self.ids[idx]
        return chunk[:, :-1], chunk[:, 1:], j == 0


def get_lr(cfg: TrainConfig, step: int, total: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based): linear warmup, then cosine to min_lr."""
    if cfg.schedule == "constant":
        return cfg.lr
    warm = math.ceil(cfg.warmup * total)
    if step < warm:
        return cfg.lr * step / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def add_shared_offset(logits: torch.Tensor, shared_offset: float) -> torch.Tensor:
    """Float32 logits with log(#unseen) added to the shared slot (the last row), in place: the
    output layer's backward does not need its output, and a copy of (B, T, V) would cost more."""
    logits = logits.float()
    if shared_offset:
        logits[..., -1] += shared_offset
    return logits


def loss_fn(logits: torch.Tensor, y: torch.Tensor, shared_offset: float) -> torch.Tensor:
    """Mean cross-entropy of (B, T, V) logits, the shared slot standing for its unseen tokens."""
    logits = add_shared_offset(logits, shared_offset)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def estimate_loss(model: TrainModel, ids: torch.Tensor, cfg: TrainConfig, vmap: VocabMap, device) -> float:
    """Mean full-vocabulary NLL (nats per token) of the validation tokens, deterministic.

    Transformers read consecutive blocks of ``block_size``; RNNs read ``eval_batch_size``
    columns with their state carried (word_language_model's evaluate).
    """
    was_training = model.training
    model.eval()
    shared = vmap.model_size - 1 if vmap.compact else -1
    corr = vmap.target_correction()
    ids = ids[: cfg.eval_tokens + 1]
    total, count = 0.0, 0

    def add(x, y, state):
        nonlocal total, count
        logits, state = model(x.to(device), state)
        logits = add_shared_offset(logits, corr)
        lp = torch.log_softmax(logits, dim=-1).gather(-1, y.to(device)[..., None])[..., 0]  # (B, T)
        nll = -lp.double()
        if shared >= 0:
            nll = nll + corr * (y.to(device) == shared)
        total += float(nll.sum())
        count += y.numel()
        return state

    if model.stateful:
        bsz = min(cfg.eval_batch_size, max(1, (len(ids) - 1) // 2))
        col = len(ids) // bsz
        cols = ids[: bsz * col].view(bsz, col)
        state = None
        for a in range(0, col - 1, cfg.block_size):
            t = min(cfg.block_size, col - 1 - a)
            state = add(cols[:, a:a + t], cols[:, a + 1:a + 1 + t], state)
    else:
        T = cfg.block_size
        starts = list(range(0, len(ids) - 1, T))
        full = [s for s in starts if s + T + 1 <= len(ids)]
        for b in range(0, len(full), cfg.eval_batch_size):
            idx = torch.as_tensor(full[b:b + cfg.eval_batch_size])[:, None] + torch.arange(T + 1)
            chunk = ids[idx]
            add(chunk[:, :-1], chunk[:, 1:], None)
        rest = [s for s in starts if s + T + 1 > len(ids)]
        if rest and len(ids) - rest[0] >= 2:
            chunk = ids[rest[0]:][None]
            add(chunk[:, :-1], chunk[:, 1:], None)
    model.train(was_training)
    return total / max(1, count)


# ---- the run folder ------------------------------------------------------------------------
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


def _versions() -> dict:
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


def export_model(out: Path, model: TrainModel, vmap: VocabMap, prep: Prepared, cfg: TrainConfig) -> int:
    """Write the final full-vocabulary model and its tokenizer into ``out``; return its parameter count."""
    sd = export_state_dict(model, vmap)

    def write(tmp: Path):
        if cfg.is_hf:
            from transformers import AutoModelForCausalLM

            full = AutoModelForCausalLM.from_config(hf_config(cfg, vmap.full_size, prep.tokenizer))
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
        prep.tokenizer.save(tmp)

    _atomic_export(out, write)
    return full_vocab_num_parameters(model, vmap)


# ---- the loop ------------------------------------------------------------------------------
def train(cfg: TrainConfig, *, progress: bool | None = None, log=print) -> TrainResult:
    """Train ``cfg`` into ``cfg.out``, resuming from its last checkpoint; a finished run is returned as is."""
    if not cfg.out:
        raise ArfuseError("no output folder: give --out (e.g. runs/kjv-slm)")
    out = Path(cfg.out).expanduser()
    existing = check_run_folder(out, cfg)
    prep = prepare(cfg)
    rid = run_id(cfg, prep)
    if existing is not None and existing.get("run_id") != rid:
        diff = [f"{k} data" for k in ("train", "valid")
                if existing.get("data", {}).get(k, {}).get("sha256") != prep.data[k]["sha256"]]
        if existing.get("tokenizer", {}).get("fingerprint") != prep.tokenizer.fingerprint:
            diff.append("tokenizer")
        raise ArfuseError(f"--out {out} holds a run on other inputs ({', '.join(diff) or 'inputs'} differ): nothing "
                          "was overwritten; choose another --out folder, or delete this one to start over")
    if existing is not None and existing.get("status") == "complete":
        return TrainResult(out, existing["step"], existing["total_steps"], existing["val_loss"],
                           existing["num_parameters"], 0.0, existing["step"], True, existing)

    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArfuseError(f"device {cfg.device!r} asked for but CUDA is not available: use --device cpu")
    threads_before = torch.get_num_threads()
    use_amp = device.type == "cuda" and (cfg.amp == "bf16" or (cfg.amp == "auto" and torch.cuda.is_bf16_supported()))

    vmap = VocabMap.build(prep.tokenizer.vocab_size, prep.train_ids, cfg.compact_vocab)
    train_ids = torch.from_numpy(vmap.to_model(prep.train_ids))
    valid_ids = torch.from_numpy(vmap.to_model(prep.valid_ids))
    batches = Batches(train_ids, cfg.batch_size, cfg.block_size, cfg.sampling, cfg.seed)
    need = cfg.batch_size * (cfg.block_size + 1)
    if batches.per_epoch < 1 or len(train_ids) < need:
        raise ArfuseError(f"corpus {cfg.data!r} gives {len(train_ids):,} training tokens, fewer than one batch needs "
                          f"(batch_size {cfg.batch_size} x (block_size {cfg.block_size} + 1) = {need:,}): give more "
                          "text, or lower batch_size or block_size")
    if len(valid_ids) < 2:
        raise ArfuseError(f"the validation text ({prep.data['valid']['spec']}) gives {len(valid_ids)} token(s): "
                          "give a longer --valid or a larger valid_fraction")
    total = cfg.max_steps or max(1, int(cfg.epochs * batches.per_epoch / cfg.grad_accum))
    eval_every = cfg.eval_every or max(1, total // 10)
    ckpt_every = cfg.checkpoint_every or eval_every

    torch.manual_seed(cfg.seed)
    model = TrainModel(cfg, vmap.model_size).to(device)
    model.train()
    decay = cfg.weight_decay if cfg.optimizer == "adamw" else 0.0
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=decay)
    offset = vmap.target_correction()  # log(#unseen), 0.0 without compaction

    meta = {
        "format": ckpt.FORMAT, "status": "training", "run_id": rid, "arch": cfg.arch,
        "model_kind": model.kind,
        "model": (hf_config(cfg, vmap.full_size, prep.tokenizer).to_dict() if cfg.is_hf
                  else rnn_config(cfg, vmap.full_size).to_dict()),
        "num_parameters": full_vocab_num_parameters(model, vmap),
        "trained_parameters": model.num_parameters(),
        "tokenizer": prep.tokenizer.describe(),
        "vocab": {"full_size": vmap.full_size, "compact": vmap.compact, "trained_rows": vmap.model_size,
                  "unseen_tokens": vmap.n_unseen},
        "data": prep.data, "config": {k: v for k, v in cfg.to_dict().items() if k != "out"},
        "identity": cfg.identity(),
        "total_steps": total, "tokens_per_step": cfg.batch_size * cfg.block_size * cfg.grad_accum,
        "step": 0, "val_loss": None, "history": [], "versions": _versions(),
    }
    out.mkdir(parents=True, exist_ok=True)
    ckpt.clean_partial(out)
    step, history, resumed_from, state = 0, [], 0, None
    loss_sum, loss_n, tokens_done, prior_seconds = 0.0, 0, 0, 0.0
    last = ckpt.list_checkpoints(out)
    if last:
        tensors, st = ckpt.load_checkpoint(last[-1], model, opt)
        step, history, resumed_from = st["step"], st["history"], st["step"]
        loss_sum, loss_n = st.get("loss_sum", 0.0), st.get("loss_n", 0)
        prior_seconds = st.get("train_seconds", 0.0)
        torch.set_rng_state(tensors["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in tensors:
            torch.cuda.set_rng_state(tensors["cuda_rng"], device)
        if "rnn_state.0" in tensors:
            state = tuple(tensors[f"rnn_state.{i}"].to(device) for i in range(st["rnn_state_parts"]))
            state = state[0] if len(state) == 1 else state
        log(f"resuming {out} from step {step:,} of {total:,}")
    else:
        ckpt.write_json(out / ckpt.META, meta)
        torch.manual_seed(cfg.seed)  # dropout's random stream starts at the seed, whatever the init drew
        log(f"training {cfg.arch} ({meta['num_parameters']:,} parameters; {model.num_parameters():,} trained, "
            f"vocabulary {vmap.model_size:,} of {vmap.full_size:,} rows) on {len(train_ids):,} tokens of {cfg.data}: "
            f"{total:,} steps of {meta['tokens_per_step']:,} tokens into {out}")

    def save(step_: int):
        tensors = {"torch_rng": torch.get_rng_state()}
        if device.type == "cuda":
            tensors["cuda_rng"] = torch.cuda.get_rng_state(device)
        extra = {"history": history, "loss_sum": loss_sum, "loss_n": loss_n,
                 "train_seconds": prior_seconds + time.time() - t0}
        if state is not None:
            parts = state if isinstance(state, tuple) else (state,)
            tensors.update({f"rnn_state.{i}": p.detach().cpu() for i, p in enumerate(parts)})
            extra["rnn_state_parts"] = len(parts)
        ckpt.save_checkpoint(out, step_, model, opt, tensors, extra, cfg.keep_checkpoints)

    def evaluate(step_: int, train_loss: float | None, t0: float, tokens_done: int):
        val = estimate_loss(model, valid_ids, cfg, vmap, device)
        history.append({"step": step_, "tokens": step_ * meta["tokens_per_step"],
                        "train_loss": None if train_loss is None else round(train_loss, 6), "val_loss": val})
        dt = time.time() - t0
        rate = tokens_done / dt if dt > 0 else 0.0
        left = (total - step_) * meta["tokens_per_step"] / rate if rate else float("nan")
        with open(out / "train_log.jsonl", "a") as f:
            f.write(json.dumps({"step": step_, "val_loss": val, "train_loss": train_loss, "elapsed_s": round(dt, 2),
                                "tokens_per_s": round(rate, 1), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
        log(f"step {step_:,}/{total:,}  train loss {train_loss if train_loss is not None else float('nan'):.4f}  "
            f"val loss {val:.4f} (ppl {math.exp(min(val, 50)):.2f})  {rate:,.0f} tok/s  "
            f"{_fmt_time(dt)} elapsed, ~{_fmt_time(left)} left")
        return val

    use_bar = sys.stderr.isatty() if progress is None else progress
    from arfuse.progress import token_progress

    t0 = time.time()
    step_seconds, stopped, eval_seconds = 0.0, False, 0.0
    det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        with token_progress(f"training {out.name}", total, step, enabled=use_bar, unit="step") as advance:
            while step < total and not stopped:
                t_step = time.time()
                lr = get_lr(cfg, step, total)
                for g in opt.param_groups:
                    g["lr"] = lr
                for a in range(cfg.grad_accum):
                    x, y, new_epoch = batches.get_batch(step * cfg.grad_accum + a)
                    if new_epoch or cfg.sampling == "random":
                        state = None
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                        logits, state = model(x.to(device), state)
                        loss = loss_fn(logits, y.to(device), offset)
                    (loss / cfg.grad_accum).backward()
                    state = model.net.detach_state(state) if model.stateful else None
                    loss_sum += loss.detach().item()
                    loss_n += 1
                    tokens_done += y.numel()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                advance(1)
                step_seconds += time.time() - t_step
                # stop where the time left would not cover the next steps' share and a last validation
                if cfg.max_minutes and step < total and \
                        prior_seconds + time.time() - t0 + eval_seconds + 2 * (time.time() - t_step) > 60 * cfg.max_minutes:
                    stopped = True
                    log(f"stopping at step {step:,} of {total:,}: the {cfg.max_minutes:g}-minute limit (max_minutes) "
                        "is reached")
                if step % eval_every == 0 or step == total or stopped:
                    t_eval = time.time()
                    evaluate(step, loss_sum / max(1, loss_n), t0, tokens_done)
                    eval_seconds = time.time() - t_eval
                    loss_sum, loss_n = 0.0, 0
                if step % ckpt_every == 0 or step == total or stopped:
                    save(step)
    finally:
        torch.use_deterministic_algorithms(det)
        torch.set_num_threads(threads_before)
    val = history[-1]["val_loss"]
    meta.update(status="complete", step=step, val_loss=val, val_ppl=math.exp(min(val, 50)), history=history)
    if step < total:
        meta["stopped_early"] = {"step": step, "reason": f"max_minutes = {cfg.max_minutes:g} reached"}
    meta["num_parameters"] = export_model(out, model, vmap, prep, cfg)
    ckpt.write_json(out / ckpt.META, meta)
    seconds = time.time() - t0
    log(f"done: {out} ({meta['num_parameters']:,} parameters), val loss {val:.4f}, perplexity {meta['val_ppl']:.2f}, "
        f"{_fmt_time(seconds)}")
    return TrainResult(out, step, total, val, meta["num_parameters"], seconds, resumed_from, False, meta,
                       step_seconds=step_seconds, tokens=tokens_done)


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
