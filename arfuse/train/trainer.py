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
from arfuse.train.batches import Batches
from arfuse.train.config import TrainConfig
from arfuse.train.corpus import encode_cached, load_corpus, split_valid
from arfuse.train.models import TrainModel, VocabMap, full_vocab_num_parameters, hf_config, rnn_config
from arfuse.train.run_folder import check_run_folder, export_model, versions
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
    run = _Run(cfg, out, prep, rid, log)
    run.start()
    run.loop(sys.stderr.isatty() if progress is None else progress)
    return run.finish()


class _Run:
    """One invocation of a run: its model, optimiser, batches and metadata, and the loop's state
    (step, history, the running loss, an RNN's carried state) that checkpoints save and restore."""

    def __init__(self, cfg: TrainConfig, out: Path, prep: Prepared, rid: str, log):
        self.cfg, self.out, self.prep, self.log = cfg, out, prep, log
        device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ArfuseError(f"device {cfg.device!r} asked for but CUDA is not available: use --device cpu")
        self.device = device
        self.use_amp = device.type == "cuda" and (cfg.amp == "bf16" or (cfg.amp == "auto" and torch.cuda.is_bf16_supported()))
        self.vmap = vmap = VocabMap.build(prep.tokenizer.vocab_size, prep.train_ids, cfg.compact_vocab)
        self.train_ids = torch.from_numpy(vmap.to_model(prep.train_ids))
        self.valid_ids = torch.from_numpy(vmap.to_model(prep.valid_ids))
        self.batches = Batches(self.train_ids, cfg.batch_size, cfg.block_size, cfg.sampling, cfg.seed)
        self._check_sizes()
        self.total = cfg.max_steps or max(1, int(cfg.epochs * self.batches.per_epoch / cfg.grad_accum))
        self.eval_every = cfg.eval_every or max(1, self.total // 10)
        self.ckpt_every = cfg.checkpoint_every or self.eval_every

        torch.manual_seed(cfg.seed)
        self.model = model = TrainModel(cfg, vmap.model_size).to(device)
        model.train()
        decay = cfg.weight_decay if cfg.optimizer == "adamw" else 0.0
        opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        self.opt = opt_cls(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=decay)
        self.offset = vmap.target_correction()  # log(#unseen), 0.0 without compaction
        self.meta = self._initial_meta(rid)
        self.step, self.history, self.resumed_from, self.state = 0, [], 0, None
        self.loss_sum, self.loss_n, self.tokens_done, self.prior_seconds = 0.0, 0, 0, 0.0
        self.step_seconds, self.eval_seconds, self.stopped, self.t0 = 0.0, 0.0, False, time.time()

    def _check_sizes(self) -> None:
        cfg, n_train = self.cfg, len(self.train_ids)
        need = cfg.batch_size * (cfg.block_size + 1)
        if self.batches.per_epoch < 1 or n_train < need:
            raise ArfuseError(f"corpus {cfg.data!r} gives {n_train:,} training tokens, fewer than one batch needs "
                              f"(batch_size {cfg.batch_size} x (block_size {cfg.block_size} + 1) = {need:,}): give "
                              "more text, or lower batch_size or block_size")
        if len(self.valid_ids) < 2:
            raise ArfuseError(f"the validation text ({self.prep.data['valid']['spec']}) gives {len(self.valid_ids)} "
                              "token(s): give a longer --valid or a larger valid_fraction")

    def _initial_meta(self, rid: str) -> dict:
        cfg, vmap, model, tok = self.cfg, self.vmap, self.model, self.prep.tokenizer
        return {
            "format": ckpt.FORMAT, "status": "training", "run_id": rid, "arch": cfg.arch,
            "model_kind": model.kind,
            "model": (hf_config(cfg, vmap.full_size, tok).to_dict() if cfg.is_hf
                      else rnn_config(cfg, vmap.full_size).to_dict()),
            "num_parameters": full_vocab_num_parameters(model, vmap),
            "trained_parameters": model.num_parameters(),
            "tokenizer": tok.describe(),
            "vocab": {"full_size": vmap.full_size, "compact": vmap.compact, "trained_rows": vmap.model_size,
                      "unseen_tokens": vmap.n_unseen},
            "data": self.prep.data, "config": {k: v for k, v in cfg.to_dict().items() if k != "out"},
            "identity": cfg.identity(),
            "total_steps": self.total, "tokens_per_step": cfg.batch_size * cfg.block_size * cfg.grad_accum,
            "step": 0, "val_loss": None, "history": [], "versions": versions(),
        }

    def start(self) -> None:
        """Resume from the last checkpoint in the run folder, or start the run there."""
        out, meta = self.out, self.meta
        out.mkdir(parents=True, exist_ok=True)
        ckpt.clean_partial(out)
        last = ckpt.list_checkpoints(out)
        if last:
            tensors, st = ckpt.load_checkpoint(last[-1], self.model, self.opt)
            self.step, self.history, self.resumed_from = st["step"], st["history"], st["step"]
            self.loss_sum, self.loss_n = st.get("loss_sum", 0.0), st.get("loss_n", 0)
            self.prior_seconds = st.get("train_seconds", 0.0)
            torch.set_rng_state(tensors["torch_rng"])
            if self.device.type == "cuda" and "cuda_rng" in tensors:
                torch.cuda.set_rng_state(tensors["cuda_rng"], self.device)
            if "rnn_state.0" in tensors:
                state = tuple(tensors[f"rnn_state.{i}"].to(self.device) for i in range(st["rnn_state_parts"]))
                self.state = state[0] if len(state) == 1 else state
            self.log(f"resuming {out} from step {self.step:,} of {self.total:,}")
        else:
            ckpt.write_json(out / ckpt.META, meta)
            torch.manual_seed(self.cfg.seed)  # dropout's random stream starts at the seed, whatever the init drew
            self.log(f"training {self.cfg.arch} ({meta['num_parameters']:,} parameters; {self.model.num_parameters():,} "
                     f"trained, vocabulary {self.vmap.model_size:,} of {self.vmap.full_size:,} rows) on "
                     f"{len(self.train_ids):,} tokens of {self.cfg.data}: {self.total:,} steps of "
                     f"{meta['tokens_per_step']:,} tokens into {out}")

    def save(self, step: int) -> None:
        tensors = {"torch_rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            tensors["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        extra = {"history": self.history, "loss_sum": self.loss_sum, "loss_n": self.loss_n,
                 "train_seconds": self.prior_seconds + time.time() - self.t0}
        if self.state is not None:
            parts = self.state if isinstance(self.state, tuple) else (self.state,)
            tensors.update({f"rnn_state.{i}": p.detach().cpu() for i, p in enumerate(parts)})
            extra["rnn_state_parts"] = len(parts)
        ckpt.save_checkpoint(self.out, step, self.model, self.opt, tensors, extra, self.cfg.keep_checkpoints)

    def evaluate(self, step: int, train_loss: float | None) -> float:
        val = estimate_loss(self.model, self.valid_ids, self.cfg, self.vmap, self.device)
        per_step = self.meta["tokens_per_step"]
        self.history.append({"step": step, "tokens": step * per_step,
                             "train_loss": None if train_loss is None else round(train_loss, 6), "val_loss": val})
        dt = time.time() - self.t0
        rate = self.tokens_done / dt if dt > 0 else 0.0
        left = (self.total - step) * per_step / rate if rate else float("nan")
        with open(self.out / "train_log.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "val_loss": val, "train_loss": train_loss, "elapsed_s": round(dt, 2),
                                "tokens_per_s": round(rate, 1), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
        self.log(f"step {step:,}/{self.total:,}  train loss {train_loss if train_loss is not None else float('nan'):.4f}  "
                 f"val loss {val:.4f} (ppl {math.exp(min(val, 50)):.2f})  {rate:,.0f} tok/s  "
                 f"{_fmt_time(dt)} elapsed, ~{_fmt_time(left)} left")
        return val

    def loop(self, use_bar: bool) -> None:
        """Optimiser steps until the schedule ends or max_minutes is reached, validating and
        checkpointing on their schedules; torch's global settings are restored on exit."""
        from arfuse.progress import token_progress

        cfg = self.cfg
        threads_before = torch.get_num_threads()
        self.t0 = time.time()
        det = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        try:
            with token_progress(f"training {self.out.name}", self.total, self.step, enabled=use_bar,
                                unit="step") as advance:
                while self.step < self.total and not self.stopped:
                    t_step = time.time()
                    self.one_step()
                    advance(1)
                    self.step_seconds += time.time() - t_step
                    self._after_step(t_step)
        finally:
            torch.use_deterministic_algorithms(det)
            torch.set_num_threads(threads_before)

    def one_step(self) -> None:
        """One optimiser step over ``grad_accum`` micro-batches."""
        cfg, device = self.cfg, self.device
        lr = get_lr(cfg, self.step, self.total)
        for g in self.opt.param_groups:
            g["lr"] = lr
        for a in range(cfg.grad_accum):
            x, y, new_epoch = self.batches.get_batch(self.step * cfg.grad_accum + a)
            if new_epoch or cfg.sampling == "random":
                self.state = None
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.use_amp):
                logits, state = self.model(x.to(device), self.state)
                loss = loss_fn(logits, y.to(device), self.offset)
            (loss / cfg.grad_accum).backward()
            self.state = self.model.net.detach_state(state) if self.model.stateful else None
            self.loss_sum += loss.detach().item()
            self.loss_n += 1
            self.tokens_done += y.numel()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1

    def _after_step(self, t_step: float) -> None:
        """The time limit, then validation and checkpoint when their schedules (or the end) say so."""
        cfg, step, total = self.cfg, self.step, self.total
        # stop where the time left would not cover the next steps' share and a last validation
        elapsed = self.prior_seconds + time.time() - self.t0
        if cfg.max_minutes and step < total and \
                elapsed + self.eval_seconds + 2 * (time.time() - t_step) > 60 * cfg.max_minutes:
            self.stopped = True
            self.log(f"stopping at step {step:,} of {total:,}: the {cfg.max_minutes:g}-minute limit (max_minutes) "
                     "is reached")
        if step % self.eval_every == 0 or step == total or self.stopped:
            t_eval = time.time()
            self.evaluate(step, self.loss_sum / max(1, self.loss_n))
            self.eval_seconds = time.time() - t_eval
            self.loss_sum, self.loss_n = 0.0, 0
        if step % self.ckpt_every == 0 or step == total or self.stopped:
            self.save(step)

    def finish(self) -> TrainResult:
        """Export the final model beside the checkpoints and mark the run complete."""
        meta, step, total = self.meta, self.step, self.total
        val = self.history[-1]["val_loss"]
        meta.update(status="complete", step=step, val_loss=val, val_ppl=math.exp(min(val, 50)), history=self.history)
        if step < total:
            meta["stopped_early"] = {"step": step, "reason": f"max_minutes = {self.cfg.max_minutes:g} reached"}
        meta["num_parameters"] = export_model(self.out, self.model, self.vmap, self.prep.tokenizer, self.cfg)
        ckpt.write_json(self.out / ckpt.META, meta)
        seconds = time.time() - self.t0
        self.log(f"done: {self.out} ({meta['num_parameters']:,} parameters), val loss {val:.4f}, perplexity "
                 f"{meta['val_ppl']:.2f}, {_fmt_time(seconds)}")
        return TrainResult(self.out, step, total, val, meta["num_parameters"], seconds, self.resumed_from, False, meta,
                           step_seconds=self.step_seconds, tokens=self.tokens_done)


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
