"""Hugging Face causal LMs: a hub id, a local folder, or a GGUF file (dequantised to float32)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from arfuse.adapters.base import (CausalLM, Encoding, MaskedKVState, ModelInfo, backend_fingerprint, file_sha256,
                                  fingerprint_json)
from arfuse.errors import ArfuseError
from arfuse.paths import cache_root

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or 'auto' (CUDA when available, else CPU)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ArfuseError(f"device {device!r} asked for but CUDA is not available: use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ArfuseError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto") from e


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ArfuseError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def gguf_converted_dir(gguf_path: Path) -> tuple[Path, str]:
    """Folder caching a GGUF file's dequantised float32 weights and tokenizer, keyed by its SHA-256.

    transformers converts GGUF on every load (tens of seconds for the tokenizer alone);
    the converted folder loads in about a second.
    """
    digest = file_sha256(gguf_path)
    return cache_root() / "gguf" / digest[:24], digest


def load_hf_tokenizer(spec: str):
    """A Hugging Face tokenizer from a hub id, a folder, or the tokenizer inside a GGUF file."""
    from transformers import AutoTokenizer

    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.exists():
            raise ArfuseError(f"GGUF file {spec} does not exist: check the path")
        conv, _ = gguf_converted_dir(path)
        if (conv / "tokenizer_config.json").exists():
            return AutoTokenizer.from_pretrained(conv)
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(spec)


@dataclass
class HFStepCache(MaskedKVState):
    """A transformers KV cache with which of its positions are real tokens and each row's next position."""

    cache: object               # transformers DynamicCache, extended in place by each step
    mask: torch.Tensor          # (B, T_past) bool, True for real tokens
    next_pos: torch.Tensor      # (B,) long
    device: torch.device        # where the cache's tensors are

    def _crop(self, n: int) -> None:
        self.cache.crop(-n)  # edited in place

    def _select(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows.to(self.device))


class HFTokenizerMethods:
    """``encode``, ``decode`` and ``tokenizer_fingerprint`` of an adapter whose ``self.tokenizer`` is a
    fast Hugging Face tokenizer (transformers models, arfuse's RNN checkpoints)."""

    _tok_fp: str | None = None

    def encode(self, text: str) -> Encoding:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return encoding_from_offsets(enc["input_ids"], enc["offset_mapping"], len(text))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def tokenizer_fingerprint(self) -> str:
        if self._tok_fp is None:
            self._tok_fp = backend_fingerprint(self.tokenizer.backend_tokenizer)
        return self._tok_fp

    # ---- running text (arfuse.adapters.token_bytes) ------------------------------------
    def _running_text(self):
        """What the tokenizer's tokens stand for and its running-text copy, made once per model."""
        rt = self.__dict__.get("_hf_token_bytes")
        if rt is None:
            from arfuse.adapters.token_bytes import HFTokenBytes

            rt = self.__dict__["_hf_token_bytes"] = HFTokenBytes(self.tokenizer, self.info.name)
        return rt

    def tokenizer_token_bytes(self) -> list[bytes | None]:
        return self._running_text().token_bytes

    def encode_piece(self, text: str) -> list[int]:
        return self._running_text().encode_piece(text)

    def piece_boundary(self, text: str) -> int:
        if self._running_text().kind == "word":
            from arfuse.adapters.token_bytes import word_boundary

            return word_boundary(text)
        return len(text)


class HFCausalLM(HFTokenizerMethods, CausalLM):
    """A transformers ``AutoModelForCausalLM`` with its fast tokenizer."""

    def __init__(self, spec: str, *, device: str = "cpu", dtype: str = "float32", revision: str | None = None,
                 name: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        path = Path(spec)
        identity: dict = {"spec": spec, "revision": revision}
        if path.suffix == ".gguf":
            if not path.exists():
                raise ArfuseError(f"GGUF file {spec} does not exist: check the path")
            conv, digest = gguf_converted_dir(path)
            identity = {"gguf_sha256": digest}
            kind = "gguf"
            if not (conv / "config.json").exists():
                tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
                model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
                # the dequantised float32 weights are plain weights: save them as such
                model.hf_quantizer = None
                if hasattr(model.config, "quantization_config"):
                    del model.config.quantization_config
                tmp = conv.with_name(conv.name + f".tmp{os.getpid()}")
                model.save_pretrained(tmp)
                tok.save_pretrained(tmp)
                if not conv.exists():
                    conv.parent.mkdir(parents=True, exist_ok=True)
                    tmp.replace(conv)
            load_from = str(conv)
        elif path.exists():
            if not path.is_dir():
                raise ArfuseError(f"{spec} is a file arfuse cannot load: give a model folder, a .gguf file, or a llama2.c .bin")
            if not (path / "config.json").exists():
                raise ArfuseError(f"{spec} has no config.json: not a Hugging Face model folder")
            load_from = str(path.resolve())
            kind = "hf"
            weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
            identity = {"path": load_from, "weights": {p.name: file_sha256(p) for p in weights},
                        "config": fingerprint_json((path / "config.json").read_text())}
        else:
            if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or path.suffix in (".bin", ".pt", ".safetensors"):
                raise ArfuseError(f"model path {spec} does not exist: check the path")
            load_from = spec
            kind = "hf"
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(load_from, revision=revision)
            self.model = AutoModelForCausalLM.from_pretrained(load_from, revision=revision, dtype=self.dtype)
        except OSError as e:
            raise ArfuseError(
                f"cannot load model {spec!r}: {str(e).splitlines()[0]} "
                "(without internet, pass a local folder or .gguf file instead of a hub id)"
            ) from e
        if kind == "hf" and "weights" not in identity:
            # hub id: the resolved commit identifies the weights
            identity["commit"] = getattr(self.model.config, "_commit_hash", None)
        if not getattr(self.tokenizer, "is_fast", False):
            raise ArfuseError(f"{spec}: arfuse needs a fast (Rust) tokenizer for character offsets; none is available")
        self.model.to(self.device).eval()
        cfg = self.model.config
        self.bos_id = self.tokenizer.bos_token_id
        self.eos_id = self.tokenizer.eos_token_id
        self.default_add_bos = bool(getattr(self.tokenizer, "add_bos_token", False))
        max_len = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        self.info = ModelInfo(
            name=name or (path.name if path.exists() else spec),
            kind=kind,
            num_parameters=sum(p.numel() for p in self.model.parameters()),
            vocab_size=int(self.model.get_output_embeddings().weight.shape[0]),
            max_length=max_len,
            identity=identity,
        )

    def forward_logits(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def network(self) -> torch.nn.Module:
        return self.model

    def input_embeddings(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight.detach()

    def output_layer(self) -> torch.nn.Linear | None:
        try:
            lin = self.model.get_output_embeddings()
        except (NotImplementedError, AttributeError):
            return None
        return lin if type(lin) is torch.nn.Linear else None

    @torch.no_grad()
    def forward_step(self, input_ids: torch.Tensor, past: HFStepCache | None = None,
                     attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, HFStepCache]:
        """Logits (B, T, V) of new tokens given the cache of the earlier ones, and the extended cache.

        ``attention_mask`` covers the new tokens only; positions count real tokens, so left
        padding (and masked-out positions in the cache) change nothing. The cache is extended in place.
        """
        from transformers import DynamicCache

        B, T = input_ids.shape
        new_mask = torch.ones(B, T, dtype=torch.bool) if attention_mask is None else attention_mask.bool().cpu()
        if past is None:
            past = HFStepCache(DynamicCache(config=self.model.config), torch.zeros(B, 0, dtype=torch.bool),
                               torch.zeros(B, dtype=torch.long), self.device)
        mask = torch.cat([past.mask, new_mask], dim=1)  # (B, T_past + T)
        pos = (past.next_pos[:, None] + new_mask.long().cumsum(1) - 1).clamp(min=0)  # (B, T)
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.long().to(self.device),
                         position_ids=pos.to(self.device), past_key_values=past.cache, use_cache=True)
        return out.logits, HFStepCache(out.past_key_values, mask, past.next_pos + new_mask.long().sum(1), self.device)

    def forward_logits_tail(self, input_ids, n):
        try:
            return self.model(input_ids=input_ids, use_cache=False, logits_to_keep=n).logits
        except TypeError:  # an architecture without logits_to_keep
            return self.model(input_ids=input_ids, use_cache=False).logits[:, -n:]


def encoding_from_offsets(ids: list[int], offsets: list[tuple[int, int]], n_chars: int) -> Encoding:
    """Character end offsets from a fast tokenizer's (start, end) spans.

    A token closes the characters up to where the next token starts (several byte-level
    tokens can share one character: only the last of them closes it); gaps the offsets
    skip (trimmed spaces) belong to the token after them; the last token closes the rest.
    """
    ends: list[int] = []
    last = 0
    n = len(ids)
    for i in range(n):
        end = offsets[i][1]
        if i + 1 < n:
            end = min(end, offsets[i + 1][0])
        last = max(last, end)
        ends.append(last)
    if ends:
        ends[-1] = n_chars
    return Encoding(list(ids), ends)
