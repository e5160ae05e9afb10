"""The segment mixture across tokenizers: segments from records, and the causal head on them."""
import json
import math

import numpy as np
import pytest

from arfuse.adapters import load_model
from arfuse.cli.main import main
from arfuse.data.text import load_dataset
from arfuse.errors import ArfuseError
from arfuse.fusion import linear
from arfuse.scoring.records import TokenRecords
from arfuse.scoring.scorer import ScoreConfig, score
from arfuse.scoring.segments import segment_records
from arfuse.search import mixture_nll, optimal_weight
from arfuse.tasks.config import EvalConfig
from arfuse.tasks.heads import evaluate

CFG = ScoreConfig(window=48, stride=16, bos="never", topk=4)
OPTS = ["--window", "48", "--stride", "16", "--bos", "never", "--topk", "4", "--quiet"]


def _rec(nbytes, logp, *, nchars=None, nwords=None, doc=None, bos=False, tokenizer="a", data_hash="h", model="m"):
    n = len(nbytes)
    doc = np.zeros(n, np.int32) if doc is None else np.asarray(doc, np.int32)
    pos = np.zeros(n, np.int32)
    for d in np.unique(doc):  # positions 1.. in each document (0 is BOS or the unscored first token)
        pos[doc == d] = np.arange(1, int((doc == d).sum()) + 1)
    z = np.zeros(n, np.int32)
    nchars = nbytes if nchars is None else nchars
    nwords = z if nwords is None else nwords
    return TokenRecords(doc, pos, z, np.asarray(logp, np.float32), np.zeros((n, 1), np.int32),
                        np.zeros((n, 1), np.float32), np.asarray(nbytes, np.int32),
                        np.asarray(nchars, np.int32), np.asarray(nwords, np.int32),
                        meta={"bos": bos, "tokenizer": tokenizer, "data_hash": data_hash, "model": model})


# "aé b cd": bytes a 1, é 2, ' ' 1, b 1, ' ' 1, c 1, d 1 (8); words end after é, b and d
DOC = "aé b cd"
# A, byte-level without BOS: [a][é1][é2][ ][b][ c][d]; [a] is unscored, [é1] closes no byte
A = {"nbytes": [0, 2, 1, 1, 2, 1], "nchars": [0, 1, 1, 1, 2, 1], "nwords": [0, 1, 0, 1, 0, 1],
     "logp": [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0]}
# B, with BOS: [aé][ b][ cd]; boundaries at bytes 0 (BOS), 3, 5, 8
B = {"nbytes": [3, 2, 3], "nchars": [2, 2, 3], "nwords": [1, 1, 1], "logp": [-10.0, -20.0, -30.0]}


def test_segments_of_two_tokenizations_sum_their_tokens_and_count_dropped_bytes():
    a = _rec(**A, tokenizer="A", model="A")
    b = _rec(**B, bos=True, tokenizer="B", model="B")
    seg = segment_records([a, b], [DOC], ["A", "B"])
    # A ends at 1 (its unscored [a]), 3 ([é1] belongs with [é2]), 4, 5, 7, 8; B at 0, 3, 5, 8.
    # Common boundaries at or after both starts (1 and 0): 3, 5, 8 -> segments (3, 5] and (5, 8]
    assert not seg.token_level
    assert len(seg) == 2
    np.testing.assert_array_equal(seg.logp, [[-3 - 4, -5 - 6], [-20, -30]])
    np.testing.assert_array_equal(seg.nbytes, [2, 3])
    np.testing.assert_array_equal(seg.nchars, [2, 3])
    np.testing.assert_array_equal(seg.nwords, [1, 1])
    assert (seg.bytes_total, seg.bytes_covered, seg.bytes_dropped) == (8, 5, 3)
    assert seg.tokens.tolist() == [4, 2]
    # a second document where the only common boundary is its end: nothing covered, all dropped
    a2 = _rec(A["nbytes"] + [1], A["logp"] + [-7.0], doc=[0] * 6 + [1], tokenizer="A")   # "xy": [x] [y]
    b2 = _rec(B["nbytes"] + [2], B["logp"] + [-40.0], doc=[0] * 3 + [1], bos=True, tokenizer="B")  # [xy]
    seg2 = segment_records([a2, b2], [DOC, "xy"], ["A", "B"])
    assert len(seg2) == 2 and (seg2.bytes_covered, seg2.bytes_dropped) == (5, 5)
    assert seg2.totals["segments"] == 2 and seg2.totals["bytes_dropped"] == 5


def test_one_tokenizer_makes_every_token_a_segment_even_inside_a_character():
    """Same tokenization, one model with BOS and one without: byte-less tokens keep their own place."""
    nb = [0, 2, 1, 1, 2, 1]
    a = _rec(nb, A["logp"], tokenizer="T")
    b = _rec([1] + nb, [-9.0] + [x - 1 for x in A["logp"]], bos=True, tokenizer="T")  # also scores [a]
    seg = segment_records([a, b], [DOC])
    assert seg.token_level and len(seg) == 6
    np.testing.assert_array_equal(seg.logp[0], A["logp"])
    np.testing.assert_array_equal(seg.logp[1], [x - 1 for x in A["logp"]])
    assert seg.bytes_dropped == 1   # [a], which only b scored


def test_records_of_other_data_are_refused_naming_the_models():
    a = _rec(**A, tokenizer="A", model="big")
    b = _rec(**B, bos=True, tokenizer="B", data_hash="other", model="small")
    with pytest.raises(ArfuseError, match=r"different data.*big.*small"):
        segment_records([a, b], [DOC])
    with pytest.raises(ArfuseError, match="other data"):
        segment_records([_rec(**B, bos=True, model="small")], ["ab"])   # 8 bytes of records for a 2-byte text


def test_same_tokenizer_segment_mixture_is_the_token_level_rule(tiny_models, text_file, one_thread):
    data = load_dataset(text_file)
    big, small = load_model(tiny_models["large"]), load_model(tiny_models["small"])
    ra, rb = (score(m, data, CFG, progress=False) for m in (big, small))
    seg = segment_records([ra, rb], data, ["large", "small"])
    # every token is a segment; only the unscored first token's bytes are dropped
    assert seg.token_level and len(seg) == len(ra) and seg.bytes_dropped == seg.bytes_total - int(ra.nbytes.sum())
    la, lb = ra.logp.astype(np.float64), rb.logp.astype(np.float64)
    np.testing.assert_array_equal(seg.logp, np.stack([la, lb]))
    tok, sg = optimal_weight(la, lb), optimal_weight(seg.logp[0], seg.logp[1])
    assert sg.w == pytest.approx(tok.w, abs=1e-12)
    assert mixture_nll(seg.logp[0], seg.logp[1], sg.w) == pytest.approx(mixture_nll(la, lb, tok.w), rel=1e-12)
    # merging tokens into coarser segments keeps each model's total log-likelihood
    coarse = segment_records([ra, rb], data, token_level=False)
    assert coarse.bytes_covered == seg.bytes_covered
    np.testing.assert_allclose(coarse.logp.sum(1), [la.sum(), lb.sum()], rtol=1e-12)


def _byte_level_lm(folder, seed: int = 5):
    """A tiny Llama whose tokenizer is bytes only (no merges): é and 日 are split into byte tokens."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["ab"], vocab_size=258, min_frequency=1, special_tokens=["<s>", "</s>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def test_eval_across_tokenizers_reports_the_segment_mixture(tiny_models, text_file, tmp_path, capsys, one_thread):
    byte_lm = _byte_level_lm(tmp_path / "bytes")
    assert len(load_model(byte_lm).encode("é").ids) == 2
    data, valid = f"{text_file}[:1200]", f"{text_file}[1200:2400]"
    cfg = EvalConfig(large=tiny_models["large"], smalls=[byte_lm], data=data, valid=valid, score=CFG)
    rep = evaluate(cfg, progress=False)
    assert rep.data["fusion"] == "segment mixture across tokenizers" and rep.gain_of == "bits per byte"
    assert [r.kind for r in rep.rows] == ["large", "small", "uniform", "fused"]
    assert all(math.isfinite(r.metrics["bits_per_byte"]) and math.isfinite(r.metrics["word_ppl"]) for r in rep.rows)
    sc = rep.data["scored"]
    assert sc["segments"] > 100 and sc["bytes"] + sc["bytes_dropped"] == sc["bytes_total"] == len(
        load_dataset(data).documents[0].encode())
    w = rep.weights[0]
    assert 0.0 <= w <= 1.0 and "validation data" in rep.weight_source and "segments" in rep.weight_source
    # the weight is the exact optimum on the validation segments; the fused row is the mixture there
    def recs(ds):
        return [score(load_model(s), load_dataset(ds), CFG, progress=False) for s in (cfg.large, byte_lm)]

    vs, ts = segment_records(recs(valid), load_dataset(valid)), segment_records(recs(data), load_dataset(data))
    assert w == pytest.approx(optimal_weight(vs.logp[0], vs.logp[1]).w, abs=1e-9)
    fused = -linear(list(ts.logp), [w, 1 - w]).sum() / math.log(2) / ts.nbytes.sum()
    assert rep.fused.metrics["bits_per_byte"] == pytest.approx(fused, rel=1e-12)
    assert rep.fused.gain_pct == pytest.approx(rep.gain_ci["gain_pct"], rel=1e-9)
    assert rep.gain_ci["ci_low"] <= rep.gain_ci["gain_pct"] <= rep.gain_ci["ci_high"]
    assert rep.domain_k is None or rep.domain_k[0] >= 0
    text = rep.to_markdown()
    for needle in ("segment mixture across tokenizers", "segments", "bytes covered", "dropped", "bits/byte",
                   "AR fused (segments)", "improvement domain"):
        assert needle in text
    json.dumps(rep.to_dict())
    # the CLI takes the pair too (records cached above)
    assert main(["eval", "--large", tiny_models["large"], "--small", byte_lm, "--data", data, "--weight", "0.8",
                 *OPTS]) == 0
    out = capsys.readouterr().out
    assert "segment mixture across tokenizers" in out and "given (--weight)" in out


def test_other_rules_across_tokenizers_are_refused_with_the_fix(tiny_models, text_file):
    cfg = EvalConfig(large=tiny_models["large"], smalls=[tiny_models["othervocab"]], data=text_file, score=CFG,
                     rule="cosine", rule_params={"power": 1.0})
    with pytest.raises(ArfuseError, match="segment mixture"):
        evaluate(cfg, progress=False)
