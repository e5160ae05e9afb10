"""The vLLM scoring backend: its spec, its refusal without a GPU or vllm, its reading of
prompt_logprobs into records (model-free), and, on a CUDA machine with vllm, its records against
the transformers backend's on the same model and text."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from arfuse.adapters import backend_for, head_of, load_model
from arfuse.adapters.vllm import window_records
from arfuse.errors import ArfuseError

HAS_GPU = torch.cuda.is_available()
HAS_VLLM = importlib.util.find_spec("vllm") is not None


@dataclass
class Logprob:
    """The fields of ``vllm.logprobs.Logprob`` that arfuse reads."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


def _prompt_logprobs(logits: torch.Tensor, seq: list[int], k: int) -> list:
    """What vLLM returns for prompt ``seq`` whose next-token logits are ``logits`` (L, V): None at
    position 0, then the top k by rank and the prompt's own token (with its rank)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    out = [None]
    for t in range(1, len(seq)):
        row = lp[t - 1]
        order = torch.argsort(row, descending=True).tolist()
        rank = {tok: r + 1 for r, tok in enumerate(order)}
        entry = {tok: Logprob(float(row[tok]), rank[tok]) for tok in order[:k]}
        entry[seq[t]] = Logprob(float(row[seq[t]]), rank[seq[t]])
        out.append(entry)
    return out


def test_vllm_specs_go_to_the_vllm_backend():
    assert backend_for("vllm:HuggingFaceTB/SmolLM2-135M").name == "vllm"
    assert head_of("vllm:HuggingFaceTB/SmolLM2-135M") == "causal"
    assert backend_for("HuggingFaceTB/SmolLM2-135M").name == "hf"


def test_window_records_read_prompt_logprobs():
    g = torch.Generator().manual_seed(0)
    V, L, k = 50, 12, 5
    logits = torch.randn(L, V, generator=g) * 3
    seq = torch.randint(0, V, (L,), generator=g).tolist()
    n = 7   # the window's last 7 positions are its targets
    lpt, tid, tlp = window_records(_prompt_logprobs(logits, seq, k), np.array(seq), n, k)
    lp = torch.log_softmax(logits, dim=-1)[L - n - 1:L - 1]      # predicts positions L-n .. L-1
    top_lp, top_ids = lp.topk(k, dim=-1)
    np.testing.assert_array_equal(tid, top_ids.numpy())
    np.testing.assert_allclose(tlp, top_lp.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(lpt, lp.gather(1, torch.tensor(seq[L - n:])[:, None])[:, 0].numpy(), atol=1e-6)
    assert tid.dtype == np.int32 and tlp.dtype == np.float32 and lpt.dtype == np.float32


def test_window_records_refuse_too_few_logprobs():
    logits = torch.randn(6, 20)
    seq = [1, 2, 3, 4, 5, 6]
    with pytest.raises(ArfuseError, match="max_logprobs must be at least --topk"):
        window_records(_prompt_logprobs(logits, seq, 3), np.array(seq), 4, 8)
    with pytest.raises(ArfuseError, match="prompt log-probs for 5 positions of a 6-token window"):
        window_records(_prompt_logprobs(logits, seq, 3)[:5], np.array(seq), 4, 3)


@pytest.mark.skipif(HAS_GPU and HAS_VLLM, reason="this machine has a CUDA GPU and vllm: the backend loads")
def test_vllm_refuses_clearly_without_gpu_or_vllm(tiny_models):
    with pytest.raises(ArfuseError) as e:
        load_model("vllm:" + tiny_models["large"])
    msg = str(e.value)
    if not HAS_GPU:
        assert "CUDA GPU" in msg and "torch.cuda.is_available() is False" in msg and "drop vllm:" in msg
    else:
        assert "pip install -e '.[vllm]'" in msg


@pytest.mark.skipif(not HAS_GPU, reason="the vLLM backend needs a CUDA GPU and this machine has none")
@pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed (pip install -e '.[vllm]')")
def test_vllm_records_match_transformers(shared_data):
    """SmolLM2-135M on a slice of real text: vLLM's records against the transformers backend's (float32)."""
    from arfuse.data.text import load_dataset
    from arfuse.scoring.scorer import ScoreConfig, score

    data = load_dataset("wikitext2-raw-test[0%:1%]")
    cfg = ScoreConfig(window=512, stride=256, topk=8)
    hf = load_model("smollm2-135m", device="cuda")
    ref = score(hf, data, cfg, use_cache=False, progress=False)
    vl = load_model("vllm:smollm2-135m")
    assert vl.info.kind == "vllm" and vl.tokenizer_fingerprint() == hf.tokenizer_fingerprint()
    rec = score(vl, data, cfg, use_cache=False, progress=False)
    np.testing.assert_array_equal(rec.target, ref.target)
    np.testing.assert_array_equal(rec.pos, ref.pos)
    np.testing.assert_allclose(rec.logp, ref.logp, atol=2e-2)
    assert abs(float(rec.logp.mean()) - float(ref.logp.mean())) < 2e-3
    assert (rec.topk_ids[:, 0] == ref.topk_ids[:, 0]).mean() > 0.99


def test_device_map_spreads_and_scores_alike(tiny_models, text_file):
    """--device map (transformers device_map="auto", the fallback for a model larger than one GPU) loads
    through accelerate's placement; without GPUs everything lands on the CPU and scores exactly alike."""
    from arfuse.data.text import load_dataset
    from arfuse.scoring.scorer import ScoreConfig, score

    data, cfg = load_dataset(text_file), ScoreConfig(window=64, stride=32)
    spread = load_model(tiny_models["small"], device="map")
    assert spread.device.type == ("cuda" if HAS_GPU else "cpu")   # where its embeddings landed
    a = score(spread, data, cfg, use_cache=False, progress=False)
    b = score(load_model(tiny_models["small"]), data, cfg, use_cache=False, progress=False)
    np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
    np.testing.assert_allclose(a.logp, b.logp, atol=1e-5 if HAS_GPU else 0)
