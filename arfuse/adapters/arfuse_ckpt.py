"""arfuse's own checkpoints: the LSTM/GRU language models that ``arfuse train`` writes
(a folder with arfuse.json, model.safetensors and tokenizer.json).

Transformers trained by arfuse are standard Hugging Face folders (they hold a config.json)
and load through ``HFCausalLM``; this adapter only sees folders without one.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from arfuse.adapters.base import CausalLM, ModelInfo, file_sha256, fingerprint_json
from arfuse.adapters.hf import HFTokenizerMethods, resolve_device
from arfuse.adapters.rnn import RNNLM, RNNConfig, RNNStepState, rnn_step
from arfuse.errors import ArfuseError


def load(path: str, device: str = "cpu") -> CausalLM:
    """The model in an arfuse checkpoint folder."""
    folder = Path(path).expanduser()
    try:
        meta = json.loads((folder / "arfuse.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArfuseError(f"{folder}/arfuse.json cannot be read ({e}): not an arfuse checkpoint") from None
    if meta.get("status") != "complete":
        raise ArfuseError(f"{folder} is a training run that has not finished (step {meta.get('step', 0):,} of "
                          f"{meta.get('total_steps', '?')}): rerun its `arfuse train` command to resume it")
    if meta.get("model_kind") == "rnn":
        return ArfuseRNNLM(folder, meta, device=device)
    raise ArfuseError(f"{folder} holds a {meta.get('model_kind')!r} model without config.json: its export is "
                      "incomplete; rerun its `arfuse train` command to write it again")


class ArfuseRNNLM(HFTokenizerMethods, CausalLM):
    """An LSTM or GRU LM trained by arfuse; reads any window from a zero state."""

    def __init__(self, folder: Path, meta: dict, device: str = "cpu"):
        from safetensors.torch import load_file
        from transformers import AutoTokenizer

        self.device = resolve_device(str(device))
        cfg = RNNConfig(**meta["model"])
        self.model = RNNLM(cfg)
        weights_path = folder / "model.safetensors"
        if not weights_path.exists():
            raise ArfuseError(f"{folder} has no model.safetensors: rerun its `arfuse train` command to export it")
        sd = load_file(str(weights_path))
        if cfg.tie_weights:
            sd["decoder.weight"] = sd["encoder.weight"]
        try:
            self.model.load_state_dict(sd)
        except RuntimeError as e:
            raise ArfuseError(f"{weights_path} does not match its arfuse.json ({str(e).splitlines()[0]}): "
                              "the folder is damaged; retrain it") from None
        self.model.to(self.device).eval()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError) as e:
            raise ArfuseError(f"{folder} has no usable tokenizer ({str(e).splitlines()[0]}): the folder is incomplete") from None
        self.bos_id = self.tokenizer.bos_token_id
        self.eos_id = self.tokenizer.eos_token_id
        self.default_add_bos = bool(getattr(self.tokenizer, "add_bos_token", False))
        self.info = ModelInfo(
            name=folder.name, kind="arfuse", num_parameters=sum(p.numel() for p in self.model.parameters()),
            vocab_size=cfg.vocab_size, max_length=None,
            identity={"path": str(folder.resolve()), "weights": file_sha256(weights_path), "arch": meta.get("arch"),
                      "config": fingerprint_json(meta["model"])})

    @torch.no_grad()
    def forward_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return rnn_step(self.model, input_ids, None, attention_mask, record=False)[0]

    @torch.no_grad()
    def forward_logits_tail(self, input_ids: torch.Tensor, n: int) -> torch.Tensor:
        out, _ = self.model.rnn(self.model.encoder(input_ids.to(self.device)))  # (B, T, H); no dropout in eval
        return self.model.decoder(out[:, -n:])

    def forward_step(self, input_ids: torch.Tensor, past: RNNStepState | None = None,
                     attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, RNNStepState]:
        """Logits (B, T, V) of new tokens given the state after the earlier ones, and the new state
        (``arfuse.adapters.rnn.rnn_step``): a padded position leaves its row's state unchanged."""
        return rnn_step(self.model, input_ids, past, attention_mask)

    def network(self) -> torch.nn.Module:
        return self.model

    def input_embeddings(self) -> torch.Tensor:
        return self.model.encoder.weight.detach()

    def output_layer(self) -> torch.nn.Linear:
        return self.model.decoder
