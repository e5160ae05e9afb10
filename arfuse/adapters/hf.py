"""Hugging Face causal LMs: a hub id, a local folder, or a GGUF file (dequantised to float32)."""
from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
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


# ---- GGUF files: checked before transformers reads them, converted quietly when progress is off ----
GGUF_MAGIC = b"GGUF"
_GGUF_FIX = "re-download it, or check the path"

# whether transformers' GGUF conversion shows its progress bars: None follows standard error (a bar
# on a terminal only); the command line sets False for --quiet
_conversion_progress: bool | None = None


def set_conversion_progress(enabled: bool | None) -> None:
    """Show (True) or hide (False) the progress bars of a GGUF file's conversion, or (None, the
    default) show them only when standard error is a terminal."""
    global _conversion_progress
    _conversion_progress = enabled


def _show_conversion_progress() -> bool:
    if _conversion_progress is not None:
        return _conversion_progress
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed standard error
        return False


def _bad_gguf(path: Path, why: str) -> ArfuseError:
    try:
        size = f"{path.stat().st_size:,} bytes"
    except OSError:
        size = "size unknown"
    return ArfuseError(f"{path}: truncated or not a GGUF file ({why}; {size}): {_GGUF_FIX}")


def check_gguf_file(path: Path, *, deep: bool = False) -> None:
    """Fail with the file, its size and the fix unless ``path`` is a GGUF file: it exists, is a
    file and starts with the GGUF magic bytes; ``deep`` also reads its header and tensor table
    (cheap: memory-mapped), which a truncated file fails."""
    if not path.exists():
        raise ArfuseError(f"GGUF file {path} does not exist: check the path")
    if not path.is_file():
        raise ArfuseError(f"{path} is a folder, not a GGUF file: give the .gguf file inside it")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise _bad_gguf(path, f"it starts with {head!r}, not the GGUF magic {GGUF_MAGIC!r}")
    if deep:
        read_gguf(path)


def read_gguf(path: Path):
    """The ``gguf`` package's reader of ``path`` (header and tensor table, memory-mapped), or None without
    that package; a damaged file fails with the file, its size and the fix."""
    try:
        from gguf import GGUFReader
    except ImportError:  # transformers reads the file itself; its failures are caught around the conversion
        return None
    import struct

    try:
        return GGUFReader(str(path))
    except (struct.error, ValueError, IndexError, KeyError, TypeError, OverflowError, EOFError, OSError) as e:
        # a short read (struct.error), "cannot reshape array" (tensor data cut off), ...
        raise _bad_gguf(path, f"its header or tensors end early: {_first_line(e)}") from None


def _first_line(e: BaseException, limit: int = 200) -> str:
    """The exception's type and message on one line, cut to ``limit`` characters."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@contextlib.contextmanager
def _gguf_conversion(path: Path):
    """Around transformers' reading of a GGUF file: its progress bars hidden unless progress is on,
    and its failures turned into one line naming the file."""
    with contextlib.ExitStack() as stack:
        if not _show_conversion_progress():
            stack.enter_context(_no_transformers_bars())
        try:
            yield
        except ArfuseError:
            raise
        except Exception as e:
            import struct

            if isinstance(e, (struct.error, EOFError)) or any(w in str(e) for w in ("reshape", "magic")):
                raise _bad_gguf(path, _first_line(e)) from e
            if isinstance(e, (MemoryError, ImportError)):
                raise
            # an architecture or tokenizer transformers cannot convert, a config it rejects, ...
            raise ArfuseError(f"{path}: transformers cannot convert this GGUF file ({_first_line(e)}): give a "
                              "GGUF of a causal LM architecture transformers supports, or the model's Hugging Face "
                              "folder or hub id") from e


@contextlib.contextmanager
def _no_transformers_bars():
    """transformers' progress bars off: its logging bars, and the GGUF module's own tqdm."""
    from functools import partial

    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    patched = []
    for name in ("transformers.modeling_gguf_pytorch_utils", "transformers.integrations.gguf.reader",
                 "transformers.integrations.ggml"):
        mod = sys.modules.get(name)
        if mod is None:
            try:
                mod = importlib.import_module(name)
            except ImportError:
                continue
        bar = getattr(mod, "tqdm", None)
        if bar is not None and not isinstance(bar, partial):
            patched.append((mod, bar))
            mod.tqdm = partial(bar, disable=True)
    try:
        yield
    finally:
        for mod, bar in patched:
            mod.tqdm = bar
        if was:
            hf_logging.enable_progress_bar()


# `arfuse export-gguf` stores the Hugging Face tokenizer a run was trained with next to llama.cpp's own
# tokenizer metadata: loaded from there, the exported model's tokenizer is the run's, fingerprint and all,
# so it fuses with models of that tokenizer on either engine (transformers' conversion of llama.cpp's
# metadata tokenises the same but is serialised differently)
EMBEDDED_TOKENIZER_KEYS = {"tokenizer.json": "arfuse.tokenizer.json",
                           "tokenizer_config.json": "arfuse.tokenizer_config.json"}


def gguf_embedded_tokenizer(path: Path, reader=None):
    """The Hugging Face tokenizer ``arfuse export-gguf`` stored in a GGUF file, or None (any other file).
    ``reader``: the file's ``read_gguf`` when the caller has it already (one parse, not two)."""
    from transformers import AutoTokenizer

    reader = reader or read_gguf(path)
    if reader is None:
        return None
    fields = reader.fields
    texts = {name: fields[key].contents() for name, key in EMBEDDED_TOKENIZER_KEYS.items() if key in fields}
    if "tokenizer.json" not in texts:
        return None
    folder = cache_root() / "gguf-tokenizer" / fingerprint_json(texts)
    if not (folder / "tokenizer.json").exists():
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            (tmp / name).write_text(text)
        if not folder.exists():
            tmp.replace(folder)
    return AutoTokenizer.from_pretrained(str(folder))


def load_hf_tokenizer(spec: str):
    """A Hugging Face tokenizer from a hub id, a folder, or the tokenizer inside a GGUF file."""
    from transformers import AutoTokenizer

    path = Path(spec)
    if path.suffix == ".gguf":
        check_gguf_file(path)
        conv, _ = gguf_converted_dir(path)
        if (conv / "tokenizer_config.json").exists():   # the transformers backend's conversion, if made
            return AutoTokenizer.from_pretrained(conv)
        reader = read_gguf(path)   # the deep check, and the fields of an embedded tokenizer
        embedded = gguf_embedded_tokenizer(path, reader)
        if embedded is not None:
            return embedded
        with _gguf_conversion(path):
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

    def _layers(self) -> list | None:
        """The cache's layers when they are plain key/value tensors (DynamicCache), else None."""
        layers = getattr(self.cache, "layers", None)
        if layers is None or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
            return None
        return layers

    def _crop_left(self, n: int) -> bool:
        layers = self._layers()
        if layers is None:
            return False
        for layer in layers:
            if layer.is_initialized and layer.keys.numel():
                layer.keys, layer.values = layer.keys[..., n:, :], layer.values[..., n:, :]
        return True

    def _concat(self, other: HFStepCache | None, n_other: int, pad_self: int, pad_other: int) -> None:
        layers = self._layers()
        theirs = other._layers() if other is not None else [None] * len(layers or [])
        if layers is None or theirs is None or len(theirs) != len(layers):
            raise ArfuseError("this model's KV cache is not a plain DynamicCache (sliding windows or a static "
                              "cache): batches cannot be joined; serve it with --max-batch 1")
        L = self.mask.shape[1] + pad_self   # the joined width
        for a, b in zip(layers, theirs):
            def kv(layer):
                ok = layer is not None and layer.is_initialized and layer.keys.numel()
                return (layer.keys, layer.values) if ok else (None, None)

            (ka, va), (kb, vb) = kv(a), kv(b)
            ref = ka if ka is not None else kb
            if ref is None:   # neither side has fed this layer anything yet
                continue

            if not a.is_initialized:
                a.lazy_initialization(ref, ref)
            n_self = self.mask.shape[0]
            a.keys = torch.cat([_left_pad(ka, ref, n_self, L), _left_pad(kb, ref, n_other, L)], dim=0)
            a.values = torch.cat([_left_pad(va, ref, n_self, L), _left_pad(vb, ref, n_other, L)], dim=0)


def _left_pad(t: torch.Tensor | None, ref: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """Cache tensor ``t`` (rows, H, T, D) padded with zeros on the left to ``width`` positions; all
    padding (shaped like ``ref``) where None: rows that have seen nothing."""
    if t is None:
        return ref.new_zeros(rows, ref.shape[1], width, ref.shape[3])
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], width - t.shape[2], t.shape[3]), t], dim=2)


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

        # "map": transformers' device_map="auto", the layers spread over every visible GPU (then the CPU),
        # for a model larger than one GPU; inputs go to the embeddings' device
        spread = device == "map"
        self.device = resolve_device("auto" if spread else device)
        self.dtype = resolve_dtype(dtype)
        path = Path(spec)
        identity: dict = {"spec": spec, "revision": revision}
        if path.suffix == ".gguf":
            check_gguf_file(path)
            conv, digest = gguf_converted_dir(path)
            identity = {"gguf_sha256": digest}
            kind = "gguf"
            if not (conv / "config.json").exists():
                reader = read_gguf(path)   # the deep check, and the fields of an embedded tokenizer
                with _gguf_conversion(path):
                    tok = gguf_embedded_tokenizer(path, reader) or AutoTokenizer.from_pretrained(str(path.parent),
                                                                                         gguf_file=path.name)
                    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                 dtype=torch.float32)
                # the dequantised float32 weights are plain weights: save them as such
                model.hf_quantizer = None
                if hasattr(model.config, "quantization_config"):
                    del model.config.quantization_config
                tmp = conv.with_name(conv.name + f".tmp{os.getpid()}")
                with _no_transformers_bars() if not _show_conversion_progress() else contextlib.nullcontext():
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
        try:   # transformers' "Loading weights" bar: on a terminal only, never under --quiet
            with _no_transformers_bars() if not _show_conversion_progress() else contextlib.nullcontext():
                self.tokenizer = AutoTokenizer.from_pretrained(load_from, revision=revision)
                self.model = AutoModelForCausalLM.from_pretrained(load_from, revision=revision, dtype=self.dtype,
                                                                  **({"device_map": "auto"} if spread else {}))
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
        if spread:
            self.device = self.model.get_input_embeddings().weight.device
            self.model.eval()
        else:
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
        name = self._cache_kwarg()
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.long().to(self.device),
                         position_ids=pos.to(self.device), use_cache=True, **{name: past.cache})
        cache = out["cache"] if name == "cache" else out.past_key_values
        return out.logits, HFStepCache(cache, mask, past.next_pos + new_mask.long().sum(1), self.device)

    def _cache_kwarg(self) -> str:
        """The name the model's forward takes its KV cache by: ``cache`` in recent transformers (which
        warns at every call that ``past_key_values`` is deprecated), ``past_key_values`` before."""
        name = self.__dict__.get("_cache_kw")
        if name is None:
            try:
                params = inspect.signature(self.model.forward).parameters
            except (TypeError, ValueError):
                params = {}
            name = self.__dict__["_cache_kw"] = "cache" if "cache" in params else "past_key_values"
        return name

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
