"""vLLM as the scoring engine on GPUs: ``vllm:HUB_ID_OR_FOLDER`` (or ``--backend vllm``; a GGUF
file or a short name of one is read through its dequantised Hugging Face folder).

Scoring needs, per target, log p(target) and the top-k ids and log-probs. vLLM gives exactly
that for the tokens of a prompt: ``SamplingParams(prompt_logprobs=k)`` returns, for each prompt
position t >= 1, a dict {token id: Logprob(logprob, rank)} holding the k most likely tokens
(ranks 1..k) and the prompt's own token at t (with its rank, whatever it is). So each window
``s[ctx_start:tgt_end]`` goes in as a ``TokensPrompt`` (token ids, no tokenizer, no BOS added)
with ``max_tokens=1``, and its last ``n_targets`` positions are the window's records: the same
windows and the same records as the transformers backend (``window_logprobs``, read by
``arfuse.scoring.shards.score_items``), computed by vLLM's kernels (float32 log-softmax over
the logits, "raw" log-probs; the logits themselves follow ``--dtype``).

The engine (``vllm.LLM``) starts on the first window, with ``max_logprobs`` set to arfuse's
top-k and prefix caching off (prompt log-probs of cached prefixes have been stale in some vLLM
versions). The tokenizer is the model's Hugging Face tokenizer, loaded here, so encoding,
BOS policy and the cache key's tokenizer hash are those of the transformers backend; the key's
model identity says "vllm" and the vLLM version, so its scores are cached apart.

vLLM returns log-probs, not logits: generation and rules that read whole distributions use
the transformers backend. ``vllm`` is imported only when such a model is loaded; without it, or
without a CUDA GPU, loading fails with the fix.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from arfuse.adapters.base import CausalLM, ModelInfo, file_sha256, fingerprint_json
from arfuse.adapters.hf import HFTokenizerMethods, resolve_dtype
from arfuse.errors import ArfuseError

PREFIX = "vllm:"
INSTALL = "pip install -e '.[vllm]'"


def is_vllm_spec(spec: str) -> bool:
    return spec.startswith(PREFIX)


def load_vllm(spec: str, *, dtype: str = "float32", name: str | None = None, **_) -> "VLLMCausalLM":
    from arfuse.adapters.aliases import resolve_alias

    inner = spec[len(PREFIX):]
    path = resolve_alias(inner) or inner
    if path.endswith(".gguf"):   # vLLM reads the dequantised Hugging Face folder arfuse makes of it once
        check_vllm()
        path = gguf_folder(path)
    return VLLMCausalLM(path, dtype=dtype, name=name or inner)


def gguf_folder(gguf: str) -> str:
    """The Hugging Face folder (float32 weights, tokenizer) of a GGUF file, converted once and cached
    (``arfuse.adapters.hf.gguf_converted_dir``)."""
    from arfuse.adapters.hf import HFCausalLM, gguf_converted_dir

    conv, _ = gguf_converted_dir(Path(gguf))
    if not (conv / "config.json").exists():
        HFCausalLM(gguf)   # converts and saves the folder
    return str(conv)


def check_vllm() -> str:
    """The vLLM version, or an ArfuseError saying why this machine cannot score with it."""
    if not torch.cuda.is_available():
        raise ArfuseError("the vLLM backend scores on a CUDA GPU and none is visible here "
                          "(torch.cuda.is_available() is False): drop vllm: / --backend vllm to score with "
                          "transformers, or run on a GPU machine")
    try:
        import vllm
    except ImportError:
        raise ArfuseError(f"the vLLM backend needs vllm, which is not installed: {INSTALL} (on a GPU machine), "
                          "or drop vllm: / --backend vllm to score with transformers") from None
    return str(getattr(vllm, "__version__", "unknown"))


def window_records(prompt_logprobs, seq, n_targets: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log p(target) (n,), top-k ids (n, k), top-k log-probs (n, k)) of the last ``n_targets``
    positions of prompt ``seq`` from vLLM's ``prompt_logprobs`` (one {id: Logprob} per position,
    None at 0): the top k are the entries ranked 1..k, best first."""
    L = len(seq)
    if prompt_logprobs is None or len(prompt_logprobs) != L:
        got = 0 if prompt_logprobs is None else len(prompt_logprobs)
        raise ArfuseError(f"vLLM returned prompt log-probs for {got} positions of a {L}-token window: check that the "
                          "vLLM version supports prompt_logprobs")
    lpt = np.empty(n_targets, np.float32)
    tid = np.empty((n_targets, k), np.int32)
    tlp = np.empty((n_targets, k), np.float32)
    for r, t in enumerate(range(L - n_targets, L)):
        entry = prompt_logprobs[t]
        target = int(seq[t])
        if entry is None or target not in entry:
            raise ArfuseError(f"vLLM gave no log-prob for the target at window position {t}")
        lpt[r] = entry[target].logprob
        ranked = sorted((lp.rank, int(tok), lp.logprob) for tok, lp in entry.items()
                        if lp.rank is not None and lp.rank <= k)
        if len(ranked) < k:
            raise ArfuseError(f"vLLM returned {len(ranked)} ranked log-probs at a position where arfuse keeps "
                              f"{k}: the engine's max_logprobs must be at least --topk")
        tid[r] = [tok for _, tok, _ in ranked[:k]]
        tlp[r] = [lp for _, _, lp in ranked[:k]]
    return lpt, tid, tlp


class VLLMCausalLM(HFTokenizerMethods, CausalLM):
    """A causal LM scored by vLLM on GPUs (``tensor_parallel_size`` GPUs per engine; default: all
    visible ones)."""

    def __init__(self, spec: str, *, dtype: str = "float32", name: str | None = None,
                 gpu_memory_utilization: float = 0.85, tensor_parallel_size: int | None = None,
                 revision: str | None = None):
        version = check_vllm()
        from transformers import AutoConfig, AutoTokenizer

        path = Path(spec).expanduser()
        self.spec = str(path.resolve()) if path.exists() else spec
        self.dtype = resolve_dtype(dtype)
        self._dtype_name = dtype
        self.revision = revision
        try:
            cfg = AutoConfig.from_pretrained(self.spec, revision=revision)
            self.tokenizer = AutoTokenizer.from_pretrained(self.spec, revision=revision)
        except OSError as e:
            raise ArfuseError(f"cannot load model {spec!r}: {str(e).splitlines()[0]}") from e
        if path.is_dir():
            weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
            identity = {"path": self.spec, "weights": {p.name: file_sha256(p) for p in weights},
                        "config": fingerprint_json((path / "config.json").read_text())}
        else:
            identity = {"spec": spec, "revision": revision, "commit": getattr(cfg, "_commit_hash", None)}
        identity["engine"] = f"vllm {version}"
        self.bos_id = self.tokenizer.bos_token_id
        self.eos_id = self.tokenizer.eos_token_id
        self.default_add_bos = bool(getattr(self.tokenizer, "add_bos_token", False))
        text_cfg = getattr(cfg, "text_config", None) or cfg
        self.info = ModelInfo(name=name or spec, kind="vllm", num_parameters=_parameter_count(self.spec, path),
                              vocab_size=int(text_cfg.vocab_size),
                              max_length=getattr(text_cfg, "max_position_embeddings", None), identity=identity)
        tp = tensor_parallel_size or max(1, torch.cuda.device_count())   # every GPU this process sees
        self._engine_kw = {"gpu_memory_utilization": gpu_memory_utilization, "tensor_parallel_size": tp}
        if tp > 1:   # its own processes on the GPUs it was given (inside a Ray worker too), not Ray's scheduler
            self._engine_kw["distributed_executor_backend"] = "mp"
        self._llm = None
        self._max_logprobs = 0
        self.device = torch.device("cuda")   # where it computes: a pool of workers gives each a GPU

    def _engine(self, k: int):
        """The vLLM engine, started on first use with ``max_logprobs`` = ``k`` (restarted for a larger k)."""
        if self._llm is None or k > self._max_logprobs:
            from vllm import LLM

            self._llm = None
            self._llm = LLM(model=self.spec, tokenizer=self.spec, revision=self.revision, dtype=self._dtype_name,
                            max_logprobs=k, enable_prefix_caching=False, seed=0, **self._engine_kw)
            self._max_logprobs = k
        return self._llm

    def window_logprobs(self, seqs: list, n_targets: list[int], k: int) -> list[tuple]:
        """For each window's tokens ``seqs[i]`` (its context and targets), the records of its last
        ``n_targets[i]`` positions: (log p(target), top-k ids, top-k log-probs)."""
        from vllm import SamplingParams

        try:
            from vllm.inputs import TokensPrompt
        except ImportError:   # older layouts export it at the top
            from vllm import TokensPrompt
        llm = self._engine(k)
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in s]) for s in seqs]
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [window_records(o.prompt_logprobs, s, n, k) for o, s, n in zip(outs, seqs, n_targets)]

    def _no_logits(self):
        return ArfuseError(f"{self.info.name} runs on vLLM, which returns the log-probs of prompts (scoring), not "
                           "logits: for generation, or a rule that reads whole distributions, load it without "
                           "vllm: (the transformers backend)")

    def forward_logits(self, input_ids, attention_mask=None):
        raise self._no_logits()

    def forward_step(self, input_ids, past=None, attention_mask=None):
        raise self._no_logits()


def _parameter_count(spec: str, path: Path) -> int:
    """Parameters from the safetensors headers (no weights read), 0 when unknown."""
    try:
        if path.is_dir():
            from safetensors import safe_open

            n = 0
            for f in sorted(path.glob("*.safetensors")):
                with safe_open(str(f), framework="np") as st:
                    for key in st.keys():
                        n += int(np.prod(st.get_slice(key).get_shape()))
            return n
        from huggingface_hub import get_safetensors_metadata

        return int(sum(get_safetensors_metadata(spec).parameter_count.values()))
    except Exception:  # noqa: BLE001 - a count for reports only; offline hub ids have none
        return 0
