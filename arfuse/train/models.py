"""The trainable models: standard Hugging Face transformers (a GPT-2 or Llama configuration)
and arfuse's LSTM/GRU, behind one ``forward(ids, state) -> (logits, state)``.

Vocabulary compaction. A corpus uses a small part of a large vocabulary (the King James Bible
uses 10,428 of SmolLM2's 49,152 tokens). With ``compact_vocab`` the model trains on the tokens
the training text holds plus one slot standing for all the others, whose logit carries
``+ log(number of others)``. Exported to the full vocabulary, every unseen token gets that
slot's row: the exported model's softmax equals the trained one exactly, so it is a
full-vocabulary model whose unseen tokens share one embedding, trained at a fraction of the
output layer's cost.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from arfuse.adapters.rnn import RNNConfig, RNNLM
from arfuse.train.config import TrainConfig

# (input embedding, output weight, output bias) parameter names of each model kind
VOCAB_PARAMS = {
    "gpt2": ("transformer.wte.weight", "lm_head.weight", None),
    "llama": ("model.embed_tokens.weight", "lm_head.weight", None),
    "rnn": ("encoder.weight", "decoder.weight", "decoder.bias"),
}


@dataclass
class VocabMap:
    """Full-vocabulary ids <-> the compact ids a model trains on (the identity when ``active`` is None)."""

    full_size: int
    active: np.ndarray | None = None   # sorted full ids present in the training text

    @classmethod
    def build(cls, full_size: int, train_ids: np.ndarray, compact: bool) -> VocabMap:
        if not compact:
            return cls(full_size)
        active = np.unique(train_ids).astype(np.int64)
        if len(active) == full_size:
            return cls(full_size)
        return cls(full_size, active)

    @property
    def compact(self) -> bool:
        return self.active is not None

    @property
    def n_unseen(self) -> int:
        return 0 if self.active is None else self.full_size - len(self.active)

    @property
    def model_size(self) -> int:
        """Rows of the trained model's vocabulary: active tokens plus the shared slot."""
        return self.full_size if self.active is None else len(self.active) + 1

    def to_model(self, ids: np.ndarray) -> np.ndarray:
        if self.active is None:
            return ids.astype(np.int64)
        table = np.full(self.full_size, len(self.active), dtype=np.int64)  # unseen -> the shared slot
        table[self.active] = np.arange(len(self.active))
        return table[ids]

    def target_correction(self) -> float:
        """log(#unseen): added to the shared slot's logit in the loss, and subtracted from the
        log-probability of a target mapped to it (one token of many)."""
        return math.log(self.n_unseen) if self.n_unseen else 0.0

    def expand_rows(self, t: torch.Tensor) -> torch.Tensor:
        """A (model_size, ...) tensor of per-token rows as (full_size, ...): unseen tokens share the last row."""
        if self.active is None:
            return t
        out = t[-1:].expand(self.full_size, *t.shape[1:]).clone()
        out[torch.as_tensor(self.active)] = t[:-1]
        return out


def model_kind(cfg: TrainConfig) -> str:
    return cfg.family if cfg.is_hf else "rnn"


def hf_config(cfg: TrainConfig, vocab_size: int, tokenizer=None):
    """A GPT-2 or Llama configuration sized by ``cfg``."""
    special = {"bos_token_id": None, "eos_token_id": None}
    if tokenizer is not None:
        special = {"bos_token_id": tokenizer.hf.bos_token_id, "eos_token_id": tokenizer.hf.eos_token_id}
    if cfg.family == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(vocab_size=vocab_size, n_positions=cfg.block_size, n_embd=cfg.embed_size,
                          n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.ffn_size,
                          activation_function=cfg.activation, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                          attn_pdrop=cfg.dropout, tie_word_embeddings=cfg.tie_weights, **special)
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.embed_size, intermediate_size=cfg.ffn_size,
                       num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                       num_key_value_heads=cfg.n_heads, max_position_embeddings=cfg.block_size,
                       hidden_act=cfg.activation, attention_dropout=cfg.dropout,
                       tie_word_embeddings=cfg.tie_weights, **special)


def rnn_config(cfg: TrainConfig, vocab_size: int) -> RNNConfig:
    return RNNConfig(cell=cfg.arch, vocab_size=vocab_size, embed_size=cfg.embed_size, hidden_size=cfg.hidden_size,
                     n_layers=cfg.n_layers, dropout=cfg.dropout, tie_weights=cfg.tie_weights)


class TrainModel(nn.Module):
    """The module being trained (compact vocabulary) with one forward for every architecture."""

    def __init__(self, cfg: TrainConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.kind = model_kind(cfg)
        if cfg.is_hf:
            from transformers import AutoModelForCausalLM

            hf_cfg = hf_config(cfg, vocab_size)
            hf_cfg._attn_implementation = "sdpa"
            self.net = AutoModelForCausalLM.from_config(hf_cfg)
        else:
            self.net = RNNLM(rnn_config(cfg, vocab_size))
        self.stateful = not cfg.is_hf

    def forward(self, ids: torch.Tensor, state=None):
        """(B, T) ids -> logits (B, T, V) and the carried state (None for transformers)."""
        if self.stateful:
            return self.net(ids, state)
        return self.net(input_ids=ids, use_cache=False).logits, None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def export_state_dict(model: TrainModel, vmap: VocabMap) -> dict[str, torch.Tensor]:
    """The trained weights with every per-token row expanded to the full vocabulary."""
    sd = {k: v.detach().clone() for k, v in model.net.state_dict().items()}
    emb, out_w, out_b = VOCAB_PARAMS[model.kind]
    for name in (emb, out_w, out_b):
        if name is not None and name in sd:
            sd[name] = vmap.expand_rows(sd[name])
    return sd


def full_vocab_num_parameters(model: TrainModel, vmap: VocabMap) -> int:
    """Parameters of the exported (full-vocabulary) model."""
    if not vmap.compact:
        return model.num_parameters()
    extra = 0
    emb, out_w, out_b = VOCAB_PARAMS[model.kind]
    seen = set()
    params = dict(model.net.named_parameters())
    for name in (emb, out_w, out_b):
        if name in params and id(params[name]) not in seen:  # a tied weight counts once
            seen.add(id(params[name]))
            p = params[name]
            extra += (vmap.full_size - vmap.model_size) * (p.numel() // p.shape[0])
    return model.num_parameters() + extra
