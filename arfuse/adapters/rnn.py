"""LSTM and GRU language models of the paper's 5.3 (PyTorch's word_language_model):
embedding -> dropout -> recurrent layers -> dropout -> linear decoder over the vocabulary;
and their incremental step for generation (``rnn_step``, ``RNNStepState``).

``arfuse train`` trains ``RNNLM``; ``arfuse.adapters.arfuse_ckpt`` loads its checkpoints.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from arfuse.adapters.base import StepState
from arfuse.errors import ArfuseError

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}
RECORD_MAX = 64   # feeds up to this long run token by token, keeping the state after each position


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


# ---- generation ----------------------------------------------------------------------------
def _unpack(s: torch.Tensor):
    """(P, L, B, H) -> what nn.LSTM (h, c) or nn.GRU (h) takes."""
    return (s[0].contiguous(), s[1].contiguous()) if s.shape[0] == 2 else s[0].contiguous()


def _pack(state) -> torch.Tensor:
    return torch.stack(state) if isinstance(state, tuple) else state[None]


@dataclass
class RNNStepState(StepState):
    """An RNN's state after each row's real tokens, and after each of the recent positions fed.

    ``history[-1]`` is the current state, (P, L, B, H): P = 2 for an LSTM (h, c), 1 for a GRU; the
    entries before it are the states after earlier positions, back to the last rollback or long
    feed (at most ``RECORD_MAX``), so a rollback restores the state after any of them."""

    history: list[torch.Tensor]

    @property
    def current(self) -> torch.Tensor:
        return self.history[-1]

    def rollback(self, n_fed: int, keep: torch.Tensor) -> None:
        if n_fed > len(self.history) - 1:
            raise ArfuseError(f"an RNN's state can take back the positions of its last feeds of up to {RECORD_MAX} "
                              f"tokens ({len(self.history) - 1} kept now), not {n_fed}: draft fewer tokens")
        past = torch.stack(self.history[len(self.history) - 1 - n_fed:])  # (n_fed + 1, P, L, B, H)
        B = past.shape[3]
        rows = torch.arange(B, device=past.device)
        at = past.permute(3, 0, 1, 2, 4)[rows, keep.to(past.device)]  # (B, P, L, H): row b after keep[b] positions
        self.history = [at.permute(1, 2, 0, 3).contiguous()]

    def select(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.current.device)
        self.history = [s[:, :, rows] for s in self.history]


@torch.no_grad()
def rnn_step(net: RNNLM, input_ids: torch.Tensor, past: RNNStepState | None = None,
             attention_mask: torch.Tensor | None = None, record: bool = True) -> tuple[torch.Tensor, RNNStepState]:
    """Logits (B, T, V) of the new tokens given the state after the earlier ones, and the new state.

    A padded position (``attention_mask`` 0) leaves its row's state as it was. With ``record``, feeds
    of up to ``RECORD_MAX`` tokens run token by token and keep the state after each position (for
    ``rollback``); longer ones run in one call per row (a rollback cannot reach into them). The
    decoder runs once on every position's output, so a replaced output layer sees one call."""
    cfg = net.cfg
    B, T = input_ids.shape
    dev = net.decoder.weight.device
    ids = input_ids.to(dev)
    mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.to(dev).bool()
    if past is None:
        n_parts = 2 if cfg.cell == "lstm" else 1
        state = torch.zeros(n_parts, cfg.n_layers, B, cfg.hidden_size, device=dev, dtype=net.decoder.weight.dtype)
        history = [state]
    else:
        state, history = past.current, list(past.history)
    x = net.encoder(ids)  # (B, T, E); no dropout in eval
    if record and T <= RECORD_MAX:
        outs = []
        for t in range(T):
            out, new = net.rnn(x[:, t:t + 1], _unpack(state))  # (B, 1, H)
            new = _pack(new)
            state = new if mask is None else torch.where(mask[None, None, :, t, None], new, state)
            history.append(state)
            outs.append(out)
        out = torch.cat(outs, 1) if outs else x.new_zeros(B, 0, cfg.hidden_size)
        history = history[-(RECORD_MAX + 1):]
    elif mask is None:
        out, new = net.rnn(x, _unpack(state))
        state = _pack(new)
        history = [state]
    else:  # left padding: each row reads its real tokens from its own state
        out = x.new_zeros(B, T, cfg.hidden_size)
        rows = []
        for b in range(B):
            keep = mask[b]
            if not bool(keep.any()):
                rows.append(state[:, :, b])
                continue
            o, new = net.rnn(x[b:b + 1, keep], _unpack(state[:, :, b:b + 1]))
            out[b, keep] = o[0]
            rows.append(_pack(new)[:, :, 0])
        state = torch.stack(rows, 2)
        history = [state]
    return net.decoder(out), RNNStepState(history)
