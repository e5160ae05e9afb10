"""A trained SLM as a GGUF file for llama.cpp (``arfuse export-gguf RUN OUT.gguf``), written with the
``gguf`` package's ``GGUFWriter``.

The models ``arfuse train`` writes as Hugging Face folders map onto llama.cpp's own architectures:

- GPT-2 (``family = "gpt2"``) -> llama.cpp ``gpt2``: learned positions, LayerNorm with bias, one
  fused QKV projection (Hugging Face's ``Conv1D`` stores weights input-major: they are transposed),
  a GELU MLP. llama.cpp computes the tanh approximation of GELU; a model trained with the exact
  (erf) GELU therefore scores slightly differently there (tests/test_export_gguf.py measures by how much).
- Llama (``family = "llama"``) -> llama.cpp ``llama``: RMSNorm, rotary positions, a SiLU-gated MLP.
  Q and K rows are permuted from Hugging Face's rotate-half order to llama.cpp's interleaved pairs,
  as llama.cpp's convert_hf_to_gguf.py does.

Anything else is refused with the part that does not map (an LSTM/GRU, an activation llama.cpp's
architecture does not compute, biases or rope scaling it has no slot for).

The tokenizer goes into the file too: llama.cpp tokenises with it. Which tokenizers export:

- one that came from a GGUF file (``tokenizer = "smollm2-135m"``, the KJV SLM's): that file's ``tokenizer.*``
  metadata is copied, after checking that the two tokenizers are the same (their fingerprints); another
  GGUF holding the same tokenizer can be named with ``tokenizer_gguf`` (``--tokenizer-gguf``), for any run.
- a Hugging Face byte-level BPE (a GPT-2-style tokenizer.json: ``tokenizer = "gpt2"``, GPT-NeoX's, one
  trained with ``tokenizers``' ByteLevelBPETokenizer): the metadata is written from the run's tokenizer.json,
  as llama.cpp's convert_hf_to_gguf.py does: llama.cpp's ``gpt2`` tokenizer model, the pre-tokenizer by the
  name llama.cpp knows it (GPT-2's regex -> ``gpt-2``; digits split one by one before it -> ``smollm``;
  Llama 3's and Qwen2's regex splits -> ``llama-bpe``, ``qwen2``: PRE_TOKENIZERS), the tokens in id order
  (special added tokens as control tokens, other added tokens user-defined, ids without a token unused),
  the merges, the BOS/EOS/UNK/PAD ids the tokenizer has, and add_bos/add_eos as the tokenizer adds them.
  A pre-tokenizer, normaliser (NFC only, with a note) or BPE option llama.cpp has no counterpart for is
  refused, naming it.
- anything else (SentencePiece unigram or BPE, WordPiece, arfuse's word-level vocabulary) is refused, naming
  the kind: llama.cpp reads such a tokenizer only from a GGUF file (give one with ``--tokenizer-gguf``).

A compact-vocabulary run (models.py) is exported by ``arfuse train`` at the full vocabulary already,
every unseen token sharing one row: the GGUF holds that full-vocabulary model.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from arfuse.adapters.hf import EMBEDDED_TOKENIZER_KEYS
from arfuse.errors import ArfuseError

DTYPES = ("f32", "f16")
GELU_NAMES = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # llama.cpp's gpt2 FFN: GELU (tanh form)


@dataclass
class ExportResult:
    path: Path
    arch: str            # the llama.cpp architecture written ("gpt2", "llama")
    dtype: str
    n_tensors: int
    n_bytes: int
    tokenizer_from: str  # the GGUF file whose tokenizer metadata was copied, or the tokenizer.json it was written from
    notes: list[str]

    def describe(self) -> dict:
        return {"path": str(self.path), "arch": self.arch, "dtype": self.dtype, "tensors": self.n_tensors,
                "bytes": self.n_bytes, "tokenizer_from": self.tokenizer_from, "notes": self.notes}


# ---- reading the run folder ------------------------------------------------------------------------
def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise ArfuseError(f"{path} cannot be read ({e}): the run folder is damaged") from None


def _load_weights(folder: Path) -> dict:
    """The folder's tensors by name (torch float32 tensors), from model.safetensors or its shards."""
    from safetensors.torch import load_file

    single = folder / "model.safetensors"
    if single.exists():
        return load_file(str(single))
    index = _read_json(folder / "model.safetensors.index.json")
    if index is None:
        raise ArfuseError(f"{folder} has no model.safetensors: export a finished run (rerun its `arfuse train` "
                          "command to write the final model)")
    out: dict = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(folder / shard)))
    return out


def _check_run(folder: Path) -> tuple[dict, dict | None]:
    """(config.json, arfuse.json or None) of a finished Hugging Face-shaped run; errors that say why not."""
    if not folder.is_dir():
        raise ArfuseError(f"{folder} is not a folder: give the run folder `arfuse train --out` wrote")
    meta = _read_json(folder / "arfuse.json")
    if meta is not None and meta.get("status") not in (None, "complete"):
        raise ArfuseError(f"{folder} is a training run that has not finished (step {meta.get('step', 0):,}): "
                          "rerun its `arfuse train` command, then export it")
    cfg = _read_json(folder / "config.json")
    if cfg is None:
        kind = (meta or {}).get("model_kind")
        if kind == "rnn":
            arch = (meta or {}).get("arch", "rnn")
            raise ArfuseError(f"{folder} holds an {arch.upper()} (arfuse's recurrent LM): llama.cpp has no LSTM/GRU "
                              "architecture, so it cannot be exported to GGUF; fuse it with the transformers "
                              "backend (give the folder itself)")
        raise ArfuseError(f"{folder} has no config.json: not a transformer run folder (export a run of "
                          "`arfuse train --arch transformer`)")
    return cfg, meta


# ---- the architectures -----------------------------------------------------------------------------
def _refuse(folder: Path, what: str) -> ArfuseError:
    return ArfuseError(f"{folder} cannot be exported to GGUF: {what}")


def _output(cfg: dict, sd: dict) -> list:
    """The output layer's tensor when it is not tied to the embedding (llama.cpp reuses token_embd otherwise)."""
    if cfg.get("tie_word_embeddings", True) or "lm_head.weight" not in sd:
        return []
    return [("output.weight", sd["lm_head.weight"])]


def _gpt2_plan(folder: Path, cfg: dict, sd: dict, notes: list[str]):
    act = cfg.get("activation_function", "gelu_new")
    if act not in GELU_NAMES:
        raise _refuse(folder, f"its MLP activation is {act!r}, and llama.cpp's gpt2 architecture computes GELU only "
                              "(train with activation = \"gelu\" or \"gelu_new\")")
    if act == "gelu":
        notes.append("activation: the model was trained with exact (erf) GELU; llama.cpp computes the tanh "
                     "approximation, so its log-probs differ slightly")
    for key, ok, why in (("scale_attn_by_inverse_layer_idx", False, "attention scaled by 1/layer index"),
                         ("scale_attn_weights", True, "unscaled attention scores"),
                         ("add_cross_attention", False, "cross-attention layers")):
        if bool(cfg.get(key, ok)) != ok:
            raise _refuse(folder, f"{why} ({key} = {cfg.get(key)!r}): llama.cpp's gpt2 architecture has none")
    n_layer, n_embd = int(cfg["n_layer"]), int(cfg["n_embd"])
    hp = {"context_length": int(cfg["n_positions"]), "embedding_length": n_embd,
          "feed_forward_length": int(cfg.get("n_inner") or 4 * n_embd), "block_count": n_layer,
          "head_count": int(cfg["n_head"]), "layer_norm_eps": float(cfg.get("layer_norm_epsilon", 1e-5))}
    p = "transformer."
    wte = sd[p + "wte.weight"]
    tensors = [("token_embd.weight", wte), ("position_embd.weight", sd[p + "wpe.weight"]),
               ("output_norm.weight", sd[p + "ln_f.weight"]), ("output_norm.bias", sd[p + "ln_f.bias"]),
               *_output(cfg, sd)]
    conv = {"attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    norms = {"ln_1": "attn_norm", "ln_2": "ffn_norm"}
    for i in range(n_layer):
        h = f"{p}h.{i}."
        for hf, gg in norms.items():
            tensors += [(f"blk.{i}.{gg}.weight", sd[f"{h}{hf}.weight"]), (f"blk.{i}.{gg}.bias", sd[f"{h}{hf}.bias"])]
        for hf, gg in conv.items():  # Conv1D keeps (in, out): llama.cpp wants (out, in) rows
            tensors += [(f"blk.{i}.{gg}.weight", sd[f"{h}{hf}.weight"].T), (f"blk.{i}.{gg}.bias", sd[f"{h}{hf}.bias"])]
    return "gpt2", hp, tensors


def _permute_rope(w, n_head: int):
    """Hugging Face's rotate-half row order -> llama.cpp's interleaved pairs (convert_hf_to_gguf.py)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama_plan(folder: Path, cfg: dict, sd: dict, notes: list[str]):
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise _refuse(folder, f"its MLP activation is {act!r}, and llama.cpp's llama architecture computes a "
                              "SiLU-gated MLP only (train the llama family with activation = \"silu\")")
    for key, why in (("attention_bias", "biases on the attention projections"), ("mlp_bias", "biases in the MLP")):
        if cfg.get(key):
            raise _refuse(folder, f"{why} ({key} = true): llama.cpp's llama architecture has none")
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or ({k: v for k, v in rope.items() if k != "rope_theta"}
                                          if rope.get("rope_type", "default") != "default" else None)
    if scaling:
        raise _refuse(folder, f"rope scaling {scaling!r}: only plain rotary positions are exported")
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    n_layer, hidden = int(cfg["num_hidden_layers"]), int(cfg["hidden_size"])
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    head_dim = int(cfg.get("head_dim") or hidden // n_head)
    hp = {"context_length": int(cfg["max_position_embeddings"]), "embedding_length": hidden,
          "feed_forward_length": int(cfg["intermediate_size"]), "block_count": n_layer, "head_count": n_head,
          "head_count_kv": n_kv, "layer_norm_rms_eps": float(cfg.get("rms_norm_eps", 1e-6)),
          "rope_freq_base": theta, "rope_dimension_count": head_dim}
    if head_dim != hidden // n_head:
        hp["key_length"] = hp["value_length"] = head_dim
    p = "model."
    emb = sd[p + "embed_tokens.weight"]
    tensors = [("token_embd.weight", emb), ("output_norm.weight", sd[p + "norm.weight"]), *_output(cfg, sd)]
    for i in range(n_layer):
        h = f"{p}layers.{i}."
        tensors += [
            (f"blk.{i}.attn_norm.weight", sd[h + "input_layernorm.weight"]),
            (f"blk.{i}.attn_q.weight", _permute_rope(sd[h + "self_attn.q_proj.weight"], n_head)),
            (f"blk.{i}.attn_k.weight", _permute_rope(sd[h + "self_attn.k_proj.weight"], n_kv)),
            (f"blk.{i}.attn_v.weight", sd[h + "self_attn.v_proj.weight"]),
            (f"blk.{i}.attn_output.weight", sd[h + "self_attn.o_proj.weight"]),
            (f"blk.{i}.ffn_norm.weight", sd[h + "post_attention_layernorm.weight"]),
            (f"blk.{i}.ffn_gate.weight", sd[h + "mlp.gate_proj.weight"]),
            (f"blk.{i}.ffn_up.weight", sd[h + "mlp.up_proj.weight"]),
            (f"blk.{i}.ffn_down.weight", sd[h + "mlp.down_proj.weight"]),
        ]
    return "llama", hp, tensors


PLANS = {"gpt2": _gpt2_plan, "llama": _llama_plan}


# ---- the tokenizer ---------------------------------------------------------------------------------
def _tokenizer_source(folder: Path, meta: dict | None, tokenizer_gguf: str | None) -> Path:
    """The GGUF file whose tokenizer the run uses (checked by fingerprint against the run's tokenizer.json)."""
    from arfuse.adapters.aliases import ALIASES, resolve_alias
    from arfuse.adapters.hf import load_hf_tokenizer
    from arfuse.train.tokenizers import fingerprint_of

    if tokenizer_gguf is None:   # the run's own tokenizer came from a GGUF file (arfuse.json says which)
        tokenizer_gguf = ((meta or {}).get("tokenizer") or {})["spec"]
    spec = tokenizer_gguf
    path = Path(resolve_alias(spec) if spec.lower() in ALIASES else spec).expanduser()
    if path.suffix != ".gguf" or not path.is_file():
        raise ArfuseError(f"tokenizer source {spec!r} is not a GGUF file ({path}): give the .gguf file whose "
                          "tokenizer the run was trained on")
    from transformers import AutoTokenizer

    try:
        run_tok = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise ArfuseError(f"{folder} has no usable tokenizer ({str(e).splitlines()[0]}): the folder is incomplete") from None
    mine, theirs = fingerprint_of(run_tok), fingerprint_of(load_hf_tokenizer(str(path)))
    if mine != theirs:
        raise ArfuseError(f"the tokenizer of {folder} (fingerprint {mine}) is not the one in {path} ({theirs}): "
                          "give the GGUF file the run's tokenizer came from (--tokenizer-gguf)")
    return path


def _copy_tokenizer(writer, source: Path, vocab_size: int) -> None:
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(source))
    fields = {k: f for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    n_tokens = len(fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in fields else 0
    if n_tokens != vocab_size:
        raise ArfuseError(f"{source} holds {n_tokens:,} tokens but the model's vocabulary has {vocab_size:,} rows: "
                          "give the GGUF file the run's tokenizer came from")
    for key, f in fields.items():
        vtype = f.types[0]
        if vtype == GGUFValueType.ARRAY:
            writer.add_key_value(key, f.contents(), vtype, sub_type=f.types[-1])
        else:
            writer.add_key_value(key, f.contents(), vtype)


# ---- the tokenizer: written from a Hugging Face byte-level BPE -------------------------------------
# Pre-tokenizers llama.cpp knows by name (tokenizer.ggml.pre), recognised from the tokenizer.json's
# pre_tokenizer: llama.cpp runs its own copy of the split each name stands for (src/llama-vocab.cpp).
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# signature of the pre-tokenizer (see _pre_signature) -> (llama.cpp's name, whether llama.cpp then ignores merges
# for pieces already in the vocabulary, as Hugging Face's BPE ignore_merges does)
PRE_TOKENIZERS = {
    ("bytelevel",): ("gpt-2", False),                                   # GPT-2, GPT-NeoX/Pythia
    ("digits", "bytelevel"): ("smollm", False),                         # SmolLM, StarCoder: digits one by one
    ("split:" + GPT2_SPLIT, "bytelevel-noregex"): ("gpt-2", False),
    ("split:" + LLAMA3_SPLIT, "bytelevel-noregex"): ("llama-bpe", True),  # Llama 3
    ("split:" + QWEN2_SPLIT, "bytelevel-noregex"): ("qwen2", False),      # Qwen2
}
BYTE_LEVEL_FIX = ("give a GGUF file holding the same tokenizer (--tokenizer-gguf FILE.gguf), or train on a "
                  "byte-level BPE tokenizer (tokenizer = \"gpt2\") or a GGUF one (tokenizer = \"smollm2-135m\")")


@dataclass
class HFVocab:
    """The tokenizer.* metadata written for a Hugging Face byte-level BPE (llama.cpp's "gpt2" tokenizer model)."""

    pre: str                  # tokenizer.ggml.pre
    tokens: list[str]         # in id order, byte-level encoded as in the vocabulary; added tokens as their text
    types: list[int]          # gguf.TokenType: NORMAL, CONTROL (special added), USER_DEFINED (other added), UNUSED
    merges: list[str]         # "left right", in rank order
    special: dict[str, int]   # bos / eos / unk / pad -> id, where the tokenizer has them
    add_bos: bool             # the tokenizer puts BOS before a text when asked for special tokens
    add_eos: bool


def _byte_level_alphabet() -> set[str]:
    """The 256 characters GPT-2's byte-level BPE writes bytes as (printable ones as themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, n = set(map(chr, keep)), 0
    for b in range(256):
        if b not in keep:
            out.add(chr(256 + n))
            n += 1
    return out


def _kind_of(model: dict, pre: dict | None) -> str | None:
    """What a non-byte-level tokenizer is, in words; None for a BPE that may be byte-level."""
    mtype = model.get("type")
    if mtype == "Unigram":
        return "a SentencePiece unigram tokenizer"
    if mtype == "WordPiece":
        return "a WordPiece tokenizer"
    if mtype == "WordLevel":
        return "a word-level tokenizer"
    if mtype != "BPE":
        return f"a {mtype} tokenizer"
    steps = (pre or {}).get("pretokenizers", [pre]) if pre else []
    if model.get("byte_fallback") or any((s or {}).get("type") == "Metaspace" for s in steps):
        return "a SentencePiece BPE tokenizer (Metaspace / byte fallback)"
    return None


def _pre_signature(pre: dict | None) -> tuple[str, ...] | None:
    """The pre-tokenizer as a key of PRE_TOKENIZERS; None where a step has settings no llama.cpp split has."""
    if not pre:
        return None
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    sig = []
    for s in steps:
        t = s.get("type")
        if t == "ByteLevel":
            if s.get("add_prefix_space", False):
                return None   # llama.cpp never puts a space before a BPE text
            sig.append("bytelevel" if s.get("use_regex", True) else "bytelevel-noregex")
        elif t == "Digits" and s.get("individual_digits"):
            sig.append("digits")
        elif (t == "Split" and s.get("behavior") == "Isolated" and not s.get("invert")
              and "Regex" in (s.get("pattern") or {})):
            sig.append("split:" + s["pattern"]["Regex"])
        else:
            return None
    return tuple(sig)


def _special_in_text(tok, with_special: list[int], plain: list[int]) -> tuple[list[int], list[int]] | None:
    """(the ids the tokenizer puts before a text, those after) when it is asked for special tokens."""
    n = len(plain)
    for k in range(len(with_special) - n + 1):
        if with_special[k:k + n] == plain:
            return with_special[:k], with_special[k + n:]
    return None


def _hf_bpe_vocab(folder: Path, tok_meta: dict, vocab_size: int, notes: list[str]) -> HFVocab:
    """The GGUF tokenizer metadata of the run's Hugging Face tokenizer, a byte-level BPE; errors that say
    which part llama.cpp could not reproduce."""
    from gguf import TokenType
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise ArfuseError(f"{folder} has no usable tokenizer ({str(e).splitlines()[0]}): the folder is incomplete") from None
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise ArfuseError(f"{folder} holds a slow tokenizer (no tokenizer.json): llama.cpp's tokenizer is written from "
                          f"a tokenizer.json; {BYTE_LEVEL_FIX}")
    spec = f"{tok_meta.get('spec', folder.name)!r}"
    j = json.loads(backend.to_str())
    model, pre, norm = j["model"], j.get("pre_tokenizer"), j.get("normalizer")
    kind = _kind_of(model, pre)
    if kind:
        raise ArfuseError(f"{folder} was trained on the tokenizer {spec}, {kind}, which does not come from a GGUF file: "
                          "arfuse writes llama.cpp's tokenizer itself only for byte-level BPE tokenizers (GPT-2 style); "
                          f"{BYTE_LEVEL_FIX}")

    def refuse(what: str) -> ArfuseError:
        return ArfuseError(f"{folder}: the tokenizer {spec} is a BPE, but {what}: llama.cpp would tokenise text "
                           f"differently; {BYTE_LEVEL_FIX}")

    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise refuse(f"its {key} is {model[key]!r} (llama.cpp's BPE has none)")
    sig = _pre_signature(pre)
    if sig not in PRE_TOKENIZERS:
        raise refuse(f"its pre-tokenizer {json.dumps(pre)[:300]} is none that llama.cpp knows by name "
                     f"(known: {', '.join(sorted({p for p, _ in PRE_TOKENIZERS.values()}))})")
    pre_name, ignores_merges = PRE_TOKENIZERS[sig]
    if bool(model.get("ignore_merges", False)) != ignores_merges:
        raise refuse(f"its ignore_merges is {bool(model.get('ignore_merges'))}, and llama.cpp's {pre_name!r} "
                     f"pre-tokenizer has {ignores_merges}")
    if norm is not None:
        if norm.get("type") != "NFC":
            raise refuse(f"its normalizer {json.dumps(norm)[:200]} has no counterpart in llama.cpp")
        notes.append("tokenizer: llama.cpp does not NFC-normalise text as the Hugging Face tokenizer does: text not "
                     "already in NFC may tokenise differently there")

    bpe_vocab: dict[str, int] = model["vocab"]
    alphabet = _byte_level_alphabet()
    odd = next((t for t in bpe_vocab if not set(t) <= alphabet), None)
    if odd is not None:
        raise refuse(f"its vocabulary is not byte-level (the token {odd!r} has characters outside GPT-2's byte "
                     "alphabet)")
    merges = []
    for m in model.get("merges", []):
        pair = m.split(" ") if isinstance(m, str) else list(m)
        if len(pair) != 2 or any(" " in p or not p for p in pair):
            raise refuse(f"its merge {m!r} is not a pair of tokens without spaces")
        merges.append(" ".join(pair))

    by_id: dict[int, tuple[str, int]] = {i: (t, TokenType.NORMAL) for t, i in bpe_vocab.items()}
    for a in j.get("added_tokens", []):  # matched on the raw text by llama.cpp, before pre-tokenization
        by_id[a["id"]] = (a["content"], TokenType.CONTROL if a.get("special") else TokenType.USER_DEFINED)
    n = max(by_id) + 1
    if n > vocab_size:
        raise ArfuseError(f"the tokenizer of {folder} has {n:,} token ids but the model's vocabulary has {vocab_size:,} "
                          "rows: the folder's tokenizer is not the model's")
    tokens, types = [], []
    for i in range(vocab_size):  # ids without a token (and rows past the tokenizer): unused placeholders
        t, ty = by_id.get(i, (f"[PAD{i}]", TokenType.UNUSED))
        tokens.append(t)
        types.append(int(ty))
    if n < vocab_size or len(by_id) < n:
        notes.append(f"tokenizer: {vocab_size - len(by_id):,} model rows have no token (written as unused [PADn])")

    special = {}
    for name in ("bos", "eos", "unk", "pad"):
        i = getattr(hf, f"{name}_token_id", None)
        if i is not None:
            special[name] = int(i)
    probe = "Hello world, it's 2024."
    found = _special_in_text(hf, hf(probe)["input_ids"], hf(probe, add_special_tokens=False)["input_ids"])
    if found is None:
        raise refuse("its post-processor changes the tokens of a text, not only adds special tokens around it")
    before, after = found
    if before not in ([], [special.get("bos")]) or after not in ([], [special.get("eos")]):
        raise refuse(f"its post-processor adds {before} before and {after} after a text, and llama.cpp can add only "
                     "the BOS token before and the EOS token after")
    return HFVocab(pre_name, tokens, types, merges, special, bool(before), bool(after))


def _write_hf_vocab(writer, v: HFVocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(v.pre)
    writer.add_token_list(v.tokens)
    writer.add_token_types(v.types)
    writer.add_token_merges(v.merges)
    for name, i in v.special.items():
        getattr(writer, f"add_{name}_token_id")(i)
    writer.add_add_bos_token(v.add_bos)
    writer.add_add_eos_token(v.add_eos)


# ---- the export ------------------------------------------------------------------------------------
def export_gguf(run: str | Path, out: str | Path, *, dtype: str = "f32", tokenizer_gguf: str | None = None,
                overwrite: bool = False) -> ExportResult:
    """Write the trained model in ``run`` (a Hugging Face GPT-2 or Llama folder from ``arfuse train``) and its
    tokenizer to ``out`` as GGUF, weights in ``dtype`` ("f32", or "f16" for matrices; norms and biases stay f32)."""
    import gguf

    folder, out = Path(run).expanduser(), Path(out).expanduser()
    if dtype not in DTYPES:
        raise ArfuseError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if out.suffix != ".gguf":
        raise ArfuseError(f"{out}: name the output file with the .gguf suffix")
    if out.exists() and not overwrite:
        raise ArfuseError(f"{out} exists: nothing was overwritten; choose another name or pass --overwrite")
    cfg, meta = _check_run(folder)
    model_type = cfg.get("model_type")
    if model_type not in PLANS:
        raise _refuse(folder, f"its architecture {model_type!r} has no mapping to llama.cpp here "
                              f"(exported: {', '.join(PLANS)})")
    notes: list[str] = []
    sd = _load_weights(folder)
    try:
        arch, hp, tensors = PLANS[model_type](folder, cfg, sd, notes)
    except KeyError as e:
        raise _refuse(folder, f"its weights lack {e.args[0]!r}, which a {model_type} model has: the folder is "
                              "damaged or not a plain transformers model") from None
    vocab = int(cfg["vocab_size"])
    tok_meta = (meta or {}).get("tokenizer") or {}
    hf_vocab = None
    if tokenizer_gguf is not None or tok_meta.get("kind") == "gguf":
        source = _tokenizer_source(folder, meta, tokenizer_gguf)
    else:   # a Hugging Face tokenizer: llama.cpp's metadata written from it (byte-level BPE only)
        hf_vocab = _hf_bpe_vocab(folder, tok_meta, vocab, notes)
        source = folder / "tokenizer.json"
        notes.append(f"tokenizer: written from {source.name} (byte-level BPE, llama.cpp pre-tokenizer "
                     f"{hf_vocab.pre!r}, add_bos {hf_vocab.add_bos})")

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        writer.add_name(folder.name)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        writer.add_vocab_size(vocab)
        for key, value in hp.items():
            getattr(writer, f"add_{key}")(value)
        if hf_vocab is None:
            _copy_tokenizer(writer, source, vocab)
        else:
            _write_hf_vocab(writer, hf_vocab)
            # the run's own tokenizer files too: arfuse loads the exported model with them (an identical
            # tokenizer fingerprint), so it fuses with models of that tokenizer on either engine
            for name, key in EMBEDDED_TOKENIZER_KEYS.items():
                if (folder / name).exists():
                    writer.add_string(key, (folder / name).read_text())
        n_bytes = 0
        for name, t in tensors:
            a = t.detach().float().contiguous().numpy()
            if dtype == "f16" and a.ndim == 2:
                a = a.astype(np.float16)
            a = np.ascontiguousarray(a)
            n_bytes += a.nbytes
            writer.add_tensor(name, a)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    tmp.replace(out)
    return ExportResult(out, arch, dtype, len(tensors), n_bytes, str(source), notes)
