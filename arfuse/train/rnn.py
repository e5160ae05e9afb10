"""LSTM and GRU language models of the paper's 5.3 (PyTorch's word_language_model):
embedding -> dropout -> recurrent layers -> dropout -> linear decoder over the vocabulary."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}


@dataclass(frozen=True)
class RNNConfig:
    """Everything that rebuilds an ``RNNLM``; stored in its checkpoint's arfuse.json."""

    cell: str              # "lstm" or "gru"
    vocab_size: int
    embed_size: int
    hidden_size: int = 128
    n_layers: int = 1
    dropout: float = 0.2
    tie_weights: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


class RNNLM(nn.Module):
    """A recurrent LM; ``forward`` returns logits and the final state, so a long text can be
    read in pieces with the state carried across them (truncated backpropagation through time)."""

    def __init__(self, cfg: RNNConfig):
        super().__init__()
        if cfg.cell not in CELLS:
            raise ValueError(f"unknown cell {cfg.cell!r}")
        if cfg.tie_weights and cfg.embed_size != cfg.hidden_size:
            raise ValueError("tie_weights needs embed_size == hidden_size")
        self.cfg = cfg
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = nn.Embedding(cfg.vocab_size, cfg.embed_size)
        self.rnn = CELLS[cfg.cell](cfg.embed_size, cfg.hidden_size, cfg.n_layers, batch_first=True,
                                   dropout=cfg.dropout if cfg.n_layers > 1 else 0.0)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_weights:
            self.decoder.weight = self.encoder.weight
        # word_language_model's initialisation
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if not cfg.tie_weights:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def forward(self, input_ids: torch.Tensor, state=None):
        """(B, T) token ids -> logits (B, T, V) and the recurrent state after the last token."""
        x = self.drop(self.encoder(input_ids))  # (B, T, E)
        out, state = self.rnn(x, state)         # (B, T, H)
        return self.decoder(self.drop(out)), state

    @staticmethod
    def detach_state(state):
        if state is None:
            return None
        return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
