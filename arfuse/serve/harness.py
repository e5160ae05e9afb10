"""The lm-evaluation-harness model ``arfuse``: a fused model as lm-eval's ``LM``.

    lm_eval --model arfuse --model_args large=smollm2-135m,small=PATH,weight=0.9,rule=linear ...
    arfuse lm-eval --model arfuse --model_args ... --tasks arfuse_wikitext    # registers it first
    lm_eval.simple_evaluate(model=ArfuseLM(large=..., small=..., weight=0.9), tasks=[...])

Each request type is answered by the fused model P (any rule of ``arfuse.fusion``; the linear
AR mixture by default), cutting tokens exactly as lm-eval 0.4.13's own ``hf`` model does, so that
with ``weight=1`` (the LLM alone) the numbers are lm-eval's:

- ``loglikelihood``: lm-eval's split of context and continuation (trailing spaces move to the
  continuation, the whole text is tokenized; an empty context is the prefix token, BOS else EOS);
  the model reads the last ``max_length`` tokens; log P(continuation) and whether every
  continuation token is the fused argmax. A request met before is answered from memory.
- ``loglikelihood_rolling``: the scorer's ``disjoint`` windows (``arfuse.scoring.windows``, the
  cut of lm-eval's ``get_rolling_token_windows``) of ``max_length`` tokens, through the per-token
  score cache (a document scored before is read back, not rescored); each window's log-probs are
  summed as lm-eval sums them.
- ``generate_until``: ``arfuse.generation.generate`` (greedy, or sampling when the request asks),
  stopped at the request's stop strings, the EOS or ``max_gen_toks``.

lm-eval imports only here: ``import arfuse`` never needs it (the extra ``lm-eval``).
"""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict

import numpy as np
import torch

from arfuse.errors import ArfuseError

INSTALL = "pip install -e '.[lm-eval]'"
MODEL_NAME = "arfuse"


def require_lm_eval():
    """The ``lm_eval`` module, or an ArfuseError that says how to install it."""
    try:
        import lm_eval
        from lm_eval.api.model import LM  # noqa: F401
    except ImportError as e:
        raise ArfuseError(f"lm-evaluation-harness is not installed ({e}): {INSTALL} (lm-eval==0.4.13, the "
                          "version arfuse's parity was measured with)") from None
    return lm_eval


def _lm_base():
    require_lm_eval()
    from lm_eval.api.model import LM

    return LM


def _bool(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ArfuseError(f"model_args {name}={value!r}: use true or false")


def _number(value, name: str, kind=float, low: float | None = None):
    try:
        v = kind(value)
    except (TypeError, ValueError):
        raise ArfuseError(f"model_args {name}={value!r} is not {'an integer' if kind is int else 'a number'}") from None
    if low is not None and not v >= low:
        raise ArfuseError(f"model_args {name}={value!r} must be at least {low}")
    return v


class _ArfuseLMImpl:
    """lm-eval's model ``arfuse``, the fused model P (``ArfuseLM`` subclasses lm-eval's ``LM`` with these
    methods). Its keywords, lm-eval's ``--model_args``: ``large`` (or ``pretrained``); ``small`` (several
    joined by ``|``); ``weight`` (the LLM's w) or ``weights`` (``w1|w2|...``, the LLM first); ``rule`` (any
    registered rule, its parameters by name, e.g. ``rule=cosine,power=1.0``); ``batch_size``;
    ``max_length`` (default: the shortest context of the models); ``device``; ``dtype``; ``bos``
    (auto, always, never); ``topk`` and ``cache`` (the score cache's top-k, and false to bypass it);
    ``memo`` (loglikelihood answers remembered, 0 for none)."""

    ACCEPTED = ("large (or pretrained)", "small", "weight", "weights", "rule", "batch_size", "max_batch_size",
                "max_length", "device", "dtype", "bos", "topk", "cache", "memo")

    def __init__(self, large=None, small=None, weight=None, weights=None, rule: str = "linear",
                 batch_size=1, max_batch_size=None, max_length=None, device: str | None = None,
                 dtype: str | None = None, bos: str = "auto", topk=32, cache=True, memo=4096, **rule_params):
        super().__init__()
        from arfuse.adapters import load_model
        from arfuse.adapters.base import BOS_POLICIES
        from arfuse.fusion.registry import get_rule, resolve_weights
        from arfuse.generation.api import build_rule

        pretrained = rule_params.pop("pretrained", None)  # lm-eval's usual name for the model
        if large is None:
            large = pretrained
        elif pretrained is not None:
            raise ArfuseError("model_args give both large= and pretrained=: give the large model once (large=MODEL)")
        if large is None:
            raise ArfuseError("the arfuse lm-eval model needs large=MODEL in --model_args (a model name such as "
                              "smollm2-135m, a folder, a .gguf file), e.g. "
                              "--model_args large=smollm2-135m,small=PATH,weight=0.9")
        rule_params.pop("trust_remote_code", None)  # lm-eval passes these to every model; nothing to trust here
        rule_params.pop("parallelize", None)
        cls = get_rule(str(rule))  # an unknown rule fails here, with the registered ones named
        known = {p.name for p in cls.params}
        unknown = sorted(set(rule_params) - known)
        if unknown:
            raise ArfuseError(f"model_args {', '.join(unknown)}: not an option of the arfuse lm-eval model nor a "
                              f"parameter of the {cls.name} rule (options: {', '.join(self.ACCEPTED)}; the rule's "
                              f"parameters: {', '.join(sorted(known)) or 'none'})")
        if bos not in BOS_POLICIES:
            raise ArfuseError(f"model_args bos={bos!r}: use one of {', '.join(BOS_POLICIES)}")
        if str(batch_size).startswith("auto"):
            batch_size = 8  # arfuse does not probe memory: a fixed batch (results never depend on it)
        self._batch_size = int(_number(batch_size, "batch_size", int, 1))
        self.device_name = "auto" if device in (None, "") else str(device)
        if self.device_name.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line asks for cuda:0 by default; its hf model then runs on the CPU, and so does this
            self.device_name = "auto"
        self.dtype_name = "float32" if dtype in (None, "", "auto") else str(dtype).replace("torch.", "")
        self.bos = bos
        self.topk = int(_number(topk, "topk", int, 1))
        self.use_cache = _bool(cache, "cache")
        self.memo_size = int(_number(memo, "memo", int, 0))
        smalls = [] if small in (None, "") else [s for s in str(small).split("|") if s]
        w = None if weight in (None, "") else _number(weight, "weight")
        ws = None if weights in (None, "") else [_number(x, "weights") for x in str(weights).split("|")]
        if cls.weighted:  # bad weights fail before any model loads
            resolve_weights(w, ws, 1 + len(smalls))
        self.models = [load_model(str(large), device=self.device_name, dtype=self.dtype_name)]
        self.models += [load_model(s, device=self.device_name, dtype=self.dtype_name) for s in smalls]
        self.rule = build_rule(self.models, rule=str(rule), weight=w, weights=ws, **rule_params)
        self.rule_params = {k: v for k, v in rule_params.items() if v is not None}
        lengths = [m.info.max_length for m in self.models if m.info.max_length is not None]
        self._max_length = int(_number(max_length, "max_length", int, 1)) if max_length not in (None, "") \
            else (min(lengths) if lengths else 2048)
        if lengths and self._max_length > min(lengths):
            raise ArfuseError(f"model_args max_length={self._max_length} exceeds the shortest context of the models "
                              f"({min(lengths)} tokens): use max_length={min(lengths)} or less")
        self._memo: OrderedDict = OrderedDict()

    # ---- what lm-eval asks of a model ------------------------------------------------------
    @property
    def large(self):
        return self.models[0]

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def prefix_token_id(self) -> int:
        """lm-eval's prefix for an empty context and for rolling windows: BOS, else EOS."""
        m = self.large
        tok = m.bos_id if m.bos_id is not None else m.eos_id
        if tok is None:
            raise ArfuseError(f"{m.info.name} has neither a BOS nor an EOS token: lm-eval's empty contexts and "
                              "rolling windows need one")
        return int(tok)

    @property
    def tokenizer_name(self) -> str:
        return self.large.info.name.replace("/", "__")

    def describe(self) -> str:
        names = " + ".join(m.info.name for m in self.models)
        return f"arfuse fused model: {names}; {self.rule.describe()}; max_length {self.max_length}"

    # ---- tokens ------------------------------------------------------------------------------
    def _tok_encode(self, text: str, special: bool = True) -> list[int]:
        """lm-eval's ``tok_encode``: the tokenizer's default special tokens (BOS where it adds one)."""
        m = self.large
        lead = [m.bos_id] if special and m.uses_bos(self.bos) else []
        return lead + list(m.encode(text).ids)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        from arfuse.tasks.loglik import split_pair

        if context == "":
            cont = self._tok_encode(continuation, special=False)
            if not cont:
                raise ArfuseError("lm-eval sent a loglikelihood request with an empty context and continuation")
            p = self.prefix_token_id
            return ([p], cont) if cont[0] != p else (cont[:1], cont[1:])
        context, continuation = split_pair(context, continuation)
        whole = self._tok_encode(context + continuation)
        ctx = self._tok_encode(context)
        return ctx, whole[len(ctx):]

    # ---- fused log-probs -----------------------------------------------------------------------
    def _check_same_vocab(self, what: str) -> None:
        if not self.rule.same_vocab:
            raise ArfuseError(f"the {self.rule.name} rule fuses models with different tokenizers, which lm-eval's "
                              f"{what} requests (token by token) cannot take: use it for generation tasks, or a "
                              "rule of one tokenizer (rule=linear) with models that share one")

    @torch.no_grad()
    def _fused_rows(self, inputs: list[list[int]], n_keep: list[int]) -> list[torch.Tensor]:
        """Fused log-probs (n_keep[i], V) at the last n_keep[i] positions of each input, float32:
        inputs of one length run together, ``batch_size`` at a time."""
        out: list[torch.Tensor | None] = [None] * len(inputs)
        by_len: dict[int, list[int]] = {}
        for i, x in enumerate(inputs):
            by_len.setdefault(len(x), []).append(i)
        for _, idxs in sorted(by_len.items(), reverse=True):
            for b0 in range(0, len(idxs), self.batch_size):
                batch = idxs[b0:b0 + self.batch_size]
                keep = max(n_keep[i] for i in batch)
                x = torch.tensor([inputs[i] for i in batch], dtype=torch.long)
                per_model = []
                for m in self.models:
                    logits = m.forward_logits_tail(x.to(m.device), keep)  # (B, keep, V)
                    per_model.append(torch.log_softmax(logits.float(), dim=-1).cpu())
                for row, i in enumerate(batch):
                    lps = [lp[row, keep - n_keep[i]:] for lp in per_model]
                    out[i] = self.rule(lps).float()
        return out  # type: ignore[return-value]

    def _loglik_tokens(self, items: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(items)
        todo, inputs, n_keep = [], [], []
        for j, (ctx, cont) in enumerate(items):
            if not cont:
                raise ArfuseError("lm-eval sent a loglikelihood request whose continuation has no token of its own "
                                  "(it merges into the context's last token)")
            key = (tuple(ctx), tuple(cont))
            if key in self._memo:
                self._memo.move_to_end(key)
                results[j] = self._memo[key]
                continue
            seq = (ctx + cont)[-(self.max_length + 1):][:-1]   # lm-eval's left truncation
            todo.append((j, key, cont))
            inputs.append(seq)
            n_keep.append(len(cont))
        for (j, key, cont), lp in zip(todo, self._fused_rows(inputs, n_keep)):
            t = torch.tensor(cont, dtype=torch.long)
            tok_lp = lp.gather(1, t[:, None])[:, 0]  # (n,) float32, summed as lm-eval sums it
            ans = (float(tok_lp.sum()), bool((lp.argmax(-1) == t).all()))
            results[j] = ans
            if self.memo_size:
                self._memo[key] = ans
                if len(self._memo) > self.memo_size:
                    self._memo.popitem(last=False)
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self._check_same_vocab("loglikelihood")
        items = [self._encode_pair(*req.args) for req in requests]
        out = []
        for b0 in range(0, len(items), 256):  # bounded memory: the fused rows of 256 requests at a time
            out += self._loglik_tokens(items[b0:b0 + 256])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Summed log P of each whole text: the scorer's disjoint windows (lm-eval's cut)."""
        from arfuse.data.text import Dataset
        from arfuse.scoring.scorer import ScoreConfig, prefix_token, prepare_docs, score
        from arfuse.scoring.windows import plan_windows

        self._check_same_vocab("loglikelihood_rolling")
        texts = [req.args[0] for req in requests]
        if not texts:
            return []
        cfg = ScoreConfig(window=self.max_length, stride=None, convention="disjoint", bos=self.bos, topk=self.topk)
        h = hashlib.sha256("\x00".join(texts).encode("utf-8", "surrogatepass")).hexdigest()[:12]
        data = Dataset(f"lm-eval rolling#{len(texts)}#{h}", texts, source="lm-eval loglikelihood_rolling")
        # per document, its windows' sizes (the plan the scorer follows)
        docs = prepare_docs(self.large, data, self.large.uses_bos(cfg.bos), prefix_token(self.large, cfg))
        plans = [plan_windows(len(d.seq), window=cfg.window, convention="disjoint") for d in docs]
        if self.rule.inputs == "target":
            # log P(target) is the rule of the models' log p(target): the cached records suffice
            recs = [score(m, data, cfg, batch_size=self.batch_size, use_cache=self.use_cache, progress=False)
                    for m in self.models]
            for r in recs[1:]:
                if not np.array_equal(r.target, recs[0].target):
                    raise ArfuseError("the models tokenize the rolling texts differently: fuse models that share "
                                      "one tokenizer")
            fused = self.rule([torch.from_numpy(np.ascontiguousarray(r.logp)) for r in recs]).float()
            window_lps = []
            at = 0
            for plan in plans:
                for w in plan:
                    window_lps.append(fused[at:at + w.n_targets])
                    at += w.n_targets
            if at != len(fused):
                raise ArfuseError(f"the cached records hold {len(fused):,} targets where the windows want {at:,}: "
                                  "rescore with model_args cache=false")
        else:
            window_lps = self._rolling_full(docs, plans)
        out, k = [], 0
        for plan in plans:
            total = 0.0
            for _ in plan:
                total += float(window_lps[k].sum())   # lm-eval: a float32 sum per window, windows summed as floats
                k += 1
            out.append(total)
        return out

    def _rolling_full(self, docs, plans) -> list[torch.Tensor]:
        """Per window, the fused log P(target) from full distributions (rules other than the linear one)."""
        inputs, n_keep, targets = [], [], []
        for d, plan in zip(docs, plans):
            for w in plan:
                inputs.append(d.seq[w.ctx_start:w.tgt_end - 1].tolist())
                n_keep.append(w.n_targets)
                targets.append(torch.as_tensor(d.seq[w.tgt_start:w.tgt_end]).long())
        out = []
        for b0 in range(0, len(inputs), 64):
            rows = self._fused_rows(inputs[b0:b0 + 64], n_keep[b0:b0 + 64])
            out += [lp.gather(1, t[:, None])[:, 0] for lp, t in zip(rows, targets[b0:b0 + 64])]
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Fused generation per request, stopped at its ``until`` strings, the EOS or ``max_gen_toks``."""
        from arfuse.generation.api import generate

        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        m = self.large
        eos_text = m.decode([m.eos_id]) if m.eos_id is not None else None
        for key, idxs in groups.items():
            kw = dict(requests[idxs[0]].args[1] or {})
            until = kw.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            if eos_text and eos_text not in until:
                until.append(eos_text)
            max_gen = int(kw.pop("max_gen_toks", 256))
            do_sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 0.0) or 0.0)
            if not do_sample:
                temperature = 0.0
            top_p = float(kw.pop("top_p", 1.0) or 1.0)
            top_k = int(kw.pop("top_k", 0) or 0)
            seed = int(kw.pop("seed", 0) or 0)
            prompts = [requests[i].args[0] for i in idxs]
            for b0 in range(0, len(prompts), self.batch_size):
                res = generate(prompts[b0:b0 + self.batch_size], large=self.models[0], small=self.models[1:] or None,
                               weights=self.rule.weights if self.rule.weighted else None, rule=self.rule.name,
                               max_new_tokens=max_gen, temperature=temperature, top_p=top_p, top_k=top_k,
                               stop=[u for u in until if u] or None, seed=seed, truncate="left", bos=self.bos,
                               stop_at_eos=True, device=self.device_name, dtype=self.dtype_name,
                               **self.rule_params)
                for i, r in zip(idxs[b0:b0 + self.batch_size], res):
                    s = _decode_skip_special(m, r.token_ids)
                    for term in until:
                        if term:
                            s = s.split(term)[0]
                    out[i] = s
        return out  # type: ignore[return-value]


def _decode_skip_special(model, ids: list[int]) -> str:
    """The text of ``ids`` without special tokens, as lm-eval's ``hf`` model decodes generations."""
    tok = getattr(model, "tokenizer", None)
    if tok is not None and hasattr(tok, "decode"):
        try:
            return tok.decode(ids, skip_special_tokens=True)
        except TypeError:
            pass
    special = {model.bos_id, model.eos_id} - {None}
    return model.decode([i for i in ids if i not in special])


_CLASS = None


def lm_class():
    """``ArfuseLM``: lm-eval's ``LM`` subclass, made on first use (``register`` names it ``arfuse``)."""
    global _CLASS
    if _CLASS is None:
        LM = _lm_base()

        class ArfuseLM(_ArfuseLMImpl, LM):
            __doc__ = _ArfuseLMImpl.__doc__

            @classmethod
            def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
                from lm_eval.utils import simple_parse_args_string

                args = simple_parse_args_string(arg_string) if isinstance(arg_string, str) else dict(arg_string or {})
                extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
                return cls(**{**extra, **args})

            @classmethod
            def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
                extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
                return cls(**{**extra, **dict(arg_dict or {})})

        ArfuseLM.__module__ = __name__
        ArfuseLM.__qualname__ = ArfuseLM.__name__ = "ArfuseLM"
        _CLASS = ArfuseLM
    return _CLASS


def register() -> type:
    """Register ``ArfuseLM`` in lm-eval's model registry as ``arfuse`` (idempotent); returns the class.
    lm-eval 0.4.13 reads models from its own registry only (no entry-point group), so the command
    ``arfuse lm-eval`` calls this before it hands over to lm-eval's command line."""
    cls = lm_class()
    from lm_eval.api import registry

    try:
        current = registry.get_model(MODEL_NAME)
    except (ValueError, KeyError, ImportError, AttributeError):
        current = None
    if current is not cls:
        registry.register_model(MODEL_NAME)(cls)
    return cls


def __getattr__(name: str):
    if name == "ArfuseLM":
        return lm_class()
    raise AttributeError(name)


def task_dir():
    """The folder of arfuse's local lm-eval task configs (for ``--include_path``)."""
    from pathlib import Path

    return Path(__file__).resolve().parent / "lm_eval_tasks"
