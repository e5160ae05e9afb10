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

The tokenizer goes into the file too: llama.cpp tokenises with it. A run trained on a tokenizer that
came from a GGUF file (``tokenizer = "smollm2-135m"``, the KJV SLM's) gets that file's ``tokenizer.*``
metadata copied, after checking that the two tokenizers are the same (their fingerprints);
another GGUF holding the same tokenizer can be named with ``tokenizer_gguf``.

A compact-vocabulary run (models.py) is exported by ``arfuse train`` at the full vocabulary already,
every unseen token sharing one row: the GGUF holds that full-vocabulary model.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
    tokenizer_from: str  # the GGUF file whose tokenizer metadata was copied
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

    if tokenizer_gguf is None:
        tok = (meta or {}).get("tokenizer") or {}
        if tok.get("kind") != "gguf":
            raise ArfuseError(
                f"{folder} was trained on the tokenizer {tok.get('spec', '(unknown)')!r} ({tok.get('kind', 'no arfuse.json')}), "
                "which does not come from a GGUF file: llama.cpp needs the tokenizer in GGUF form; give a GGUF file "
                "holding the same tokenizer (--tokenizer-gguf FILE.gguf), or train on a GGUF tokenizer "
                "(tokenizer = \"smollm2-135m\")")
        tokenizer_gguf = tok["spec"]
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
    source = _tokenizer_source(folder, meta, tokenizer_gguf)

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        writer.add_name(folder.name)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        writer.add_vocab_size(vocab)
        for key, value in hp.items():
            getattr(writer, f"add_{key}")(value)
        _copy_tokenizer(writer, source, vocab)
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
