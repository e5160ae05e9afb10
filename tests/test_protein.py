"""Protein masked LMs: tiny random ESM-2 models built in-process, the real UniRef50 sample,
masking, masked-position perplexity against a direct transformers computation, fusion, bad input."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from arfuse.adapters.protein import ESM2_VOCAB, is_protein_model, load_protein_model
from arfuse.errors import ArfuseError
from arfuse.data.fasta import MaskConfig, load_protein_dataset, mask_positions, read_fasta
from arfuse.scoring.masked import masked_inputs, score_masked
from arfuse.tasks.config import EvalConfig
from arfuse.tasks.heads import evaluate
from arfuse.tasks.masked_lm import masked_ppl


def build_tiny_esm(folder: Path, *, seed: int, layers: int, hidden: int) -> Path:
    """A random ESM-2-style EsmForMaskedLM (rotary, token dropout) with ESM-2's vocabulary."""
    from transformers import EsmConfig, EsmForMaskedLM, EsmTokenizer

    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(ESM2_VOCAB) + "\n")
    tok = EsmTokenizer(str(folder / "vocab.txt"))
    torch.manual_seed(seed)
    cfg = EsmConfig(vocab_size=len(ESM2_VOCAB), mask_token_id=32, pad_token_id=1, hidden_size=hidden,
                    num_hidden_layers=layers, num_attention_heads=4, intermediate_size=2 * hidden,
                    max_position_embeddings=1026, position_embedding_type="rotary", token_dropout=True,
                    emb_layer_norm_before=False, tie_word_embeddings=False)
    model = EsmForMaskedLM(cfg)
    with torch.no_grad():  # sharper, less uniform distributions than the default init
        model.lm_head.decoder.weight.mul_(5.0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def esm(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("esm")
    return {"large": str(build_tiny_esm(root / "esm_large", seed=0, layers=2, hidden=32)),
            "small": str(build_tiny_esm(root / "esm_small", seed=1, layers=1, hidden=16))}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def uniref(shared_data) -> str:
    return str(shared_data / "protein" / "uniref50-sample.fasta")


@pytest.fixture(scope="module")
def direct(esm, uniref) -> dict:
    return {name: _direct(folder, uniref) for name, folder in esm.items()}


def _direct(folder: str, fasta: str, rate=0.15, seed=0):
    """Log-probs of the true residue at every masked position, with transformers alone, and
    the library's HF loss on the same batch: (per-position log p, exp(loss))."""
    from transformers import EsmForMaskedLM, EsmTokenizer

    tok = EsmTokenizer.from_pretrained(folder)
    model = EsmForMaskedLM.from_pretrained(folder).eval()
    seqs = [r.sequence for r in read_fasta(fasta)]
    enc = tok(seqs, padding=True, return_tensors="pt")
    ids, labels = enc["input_ids"].clone(), torch.full_like(enc["input_ids"], -100)
    for i, s in enumerate(seqs):
        pos = torch.as_tensor(mask_positions(s, rate, seed)) + 1  # after <cls>
        labels[i, pos] = ids[i, pos]
        ids[i, pos] = tok.mask_token_id
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=enc["attention_mask"], labels=labels)
    lp = torch.log_softmax(out.logits.float(), -1)
    sel = labels != -100
    return lp[sel].gather(1, labels[sel][:, None])[:, 0].numpy().astype(np.float64), math.exp(out.loss.item())


# ---- data and masking -----------------------------------------------------------------------
def test_fasta_reader(tmp_path, uniref):
    recs = read_fasta(uniref)
    assert len(recs) == 15 and recs[0].id == "UniRef50_A0A1E3NP16" and len(recs[0].sequence) == 428
    assert sum(len(r.sequence) for r in recs) == 5115
    p = tmp_path / "x.fasta"
    p.write_text(">a first\nMKV\nLLA\n\n>b\nQQ\n")
    assert [(r.id, r.description, r.sequence) for r in read_fasta(p)] == [("a", "first", "MKVLLA"), ("b", "", "QQ")]
    p.write_text("MKV\n>a\nMK\n")
    with pytest.raises(ArfuseError, match="x.fasta:1: sequence data before the first '>' header"):
        read_fasta(p)
    p.write_text(">a\n>b\nMK\n")
    with pytest.raises(ArfuseError, match="record 'a' has an empty sequence"):
        read_fasta(p)
    p.write_text("\n")
    with pytest.raises(ArfuseError, match="holds no FASTA record"):
        read_fasta(p)
    with pytest.raises(ArfuseError, match="unknown protein data set 'uniref50-smaple'.*Did you mean 'uniref50-sample'"):
        load_protein_dataset("uniref50-smaple")


def test_masking_is_fixed_by_seed_and_sequence(uniref):
    for r in read_fasta(uniref):
        L = len(r.sequence)
        m = mask_positions(r.sequence)
        assert len(m) == round(0.15 * L) and len(np.unique(m)) == len(m)
        assert m.min() >= 0 and m.max() < L
        np.testing.assert_array_equal(m, mask_positions(r.sequence))          # fixed seed: the same masks
    s = read_fasta(uniref)[0].sequence
    assert not np.array_equal(mask_positions(s, seed=0), mask_positions(s, seed=1))
    assert len(mask_positions("MK")) == 1  # at least one residue of any sequence


def test_specials_are_never_masked_and_long_sequences_are_cropped(esm, uniref):
    model = load_protein_model(esm["large"])
    ds = load_protein_dataset(uniref)
    crops = masked_inputs(model, ds, MaskConfig(max_residues=100))
    for c in crops:
        assert c.ids[0] == model.cls_id and c.ids[-1] == model.eos_id and len(c.ids) <= 102
        assert np.all(c.ids[c.positions] == model.mask_id)
        assert c.positions.min() >= 1 and c.positions.max() <= len(c.ids) - 2   # never <cls>/<eos>
        assert (c.ids == model.mask_id).sum() == len(c.positions)
    for d, r in enumerate(ds.records):  # every masked residue scored exactly once, with its true id
        got = np.sort(np.concatenate([c.positions - 1 + c.start for c in crops if c.doc == d]))
        np.testing.assert_array_equal(got, mask_positions(r.sequence))
        tg = np.concatenate([c.targets for c in crops if c.doc == d])
        assert [ESM2_VOCAB[t] for t in tg] == [r.sequence[i] for i in got]
    with pytest.raises(ArfuseError, match="mask rate 0 is outside"):
        MaskConfig(rate=0)


# ---- perplexity equals a direct transformers computation ----------------------------------------
def test_masked_perplexity_equals_direct_transformers(esm, uniref, direct):
    rep = evaluate(EvalConfig(esm["large"], [esm["small"]], uniref, weights=[0.8, 0.2]), progress=False)
    lp_l, ppl_hf_l = direct["large"]
    lp_s, ppl_hf_s = direct["small"]
    assert rep.head == "masked"
    rows = {r.kind: r.metrics for r in rep.rows}
    assert rep.masked_positions == len(lp_l) == 766
    # each model alone: exp(mean CE over masked positions) == transformers' own MLM loss
    assert rows["large"]["ppl"] == pytest.approx(ppl_hf_l, rel=1e-5)
    assert rows["small"]["ppl"] == pytest.approx(ppl_hf_s, rel=1e-5)
    assert rows["large"]["ppl"] == pytest.approx(math.exp(-lp_l.mean()), rel=1e-5)
    # fused per position: log(w p_L + (1 - w) p_S)
    fused = np.log(0.8 * np.exp(lp_l) + 0.2 * np.exp(lp_s))
    assert rows["fused"]["ppl"] == pytest.approx(math.exp(-fused.mean()), rel=1e-5)
    assert rows["uniform"]["ppl"] == pytest.approx(math.exp(-np.log(0.5 * np.exp(lp_l) + 0.5 * np.exp(lp_s)).mean()), rel=1e-5)
    assert 1 < rows["large"]["ppl"] < 1e4 and rows["large"]["ppl"] != pytest.approx(rows["small"]["ppl"], rel=1e-3)
    assert "766 masked positions" in rep.to_markdown() and rep.to_dict()["weights"] == [0.8, pytest.approx(0.2)]


def test_nll_optimal_weight_and_batch_independence(esm, uniref, direct, tmp_path):
    from arfuse.search import optimal_weight

    rep = evaluate(EvalConfig(esm["large"], [esm["small"]], uniref), progress=False)
    lp_l, lp_s = direct["large"][0], direct["small"][0]
    o = optimal_weight(lp_l, lp_s)
    assert rep.weights[0] == pytest.approx(o.w, abs=1e-4) and "NLL-optimal on the reported data itself" in rep.weight_source
    fused = {r.kind: r for r in rep.rows}["fused"]
    assert fused.metrics["ppl"] <= min(r.metrics["ppl"] for r in rep.rows if r.kind != "fused") + 1e-9
    # the gain curve is in the same units as the rows, and it peaks at k*
    ks, g = np.asarray(rep.curve["k"]), np.asarray(rep.curve["gain_pct"])
    assert g.max() <= fused.gain_pct + 1e-9 and ks[g.argmax()] == pytest.approx(rep.k_star, rel=0.05)
    model = load_protein_model(esm["small"])
    ds = load_protein_dataset(uniref)
    a = score_masked(model, ds, batch_size=1, use_cache=False, progress=False)
    b = score_masked(model, ds, batch_size=8, use_cache=False, progress=False)
    np.testing.assert_allclose(a.logp, b.logp, atol=1e-5)
    assert Path(rep.plot(str(tmp_path / "g.png"))).read_bytes()[:4] == b"\x89PNG"
    c = score_masked(model, ds, progress=False)  # from the cache written by evaluate
    np.testing.assert_array_equal(c.target, a.target)


# ---- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("seq,match", [
    ("MKVJLA", r"record 'bad': character 'J' at residue 4 .* outside .* alphabet"),
    ("MKVlla", r"character 'l' at residue 4 \(and 2 more.*lowercase letters: uppercase the sequence"),
    ("MKVLA*", r"character '\*' at residue 6 .*stop codon: strip it"),
])
def test_characters_outside_the_alphabet(esm, tmp_path, seq, match):
    p = tmp_path / "bad.fasta"
    p.write_text(f">ok\nMKVLA\n>bad\n{seq}\n")
    with pytest.raises(ArfuseError, match=match):
        evaluate(EvalConfig(esm["large"], [esm["small"]], str(p)), progress=False)


def test_protein_model_names(esm):
    assert is_protein_model(esm["large"]) and is_protein_model("esm2_8m")
    assert is_protein_model("facebook/esm2_t6_8M_UR50D") and not is_protein_model("resnet20")
    assert not is_protein_model("stories260k")
    with pytest.raises(ArfuseError, match="unknown ESM-2 name 'esm2_9m'.*Did you mean 'esm2_8m'"):
        load_protein_model("esm2_9m")
    with pytest.raises(ArfuseError, match="does not exist"):
        load_protein_model("./no/such/esm")
    assert masked_ppl(np.array([-80.0])) == math.inf  # the paper's cap: mean CE above 70 -> inf


def test_weight_chosen_on_validation_sequences(esm, uniref, tmp_path):
    from arfuse.search import optimal_weight

    recs = read_fasta(uniref)
    for name, part in [("valid", recs[:7]), ("test", recs[7:])]:
        (tmp_path / f"{name}.fasta").write_text("".join(f">{r.id}\n{r.sequence}\n" for r in part))
    rep = evaluate(EvalConfig(esm["large"], [esm["small"]], str(tmp_path / "test.fasta"),
                              valid=str(tmp_path / "valid.fasta")), progress=False)
    vds = load_protein_dataset(str(tmp_path / "valid.fasta"))
    lv = [score_masked(load_protein_model(esm[k]), vds, progress=False).logp for k in ("large", "small")]
    assert rep.weights[0] == pytest.approx(optimal_weight(*lv).w, abs=1e-9)
    assert rep.weight_source.startswith("NLL-optimal on the validation data") and rep.valid["sequences"] == 7
    assert rep.data["sequences"] == 8


def test_law_members_for_an_esm_family(esm, uniref):
    from arfuse.search.law import analyse_family
    from arfuse.tasks.law import family_members

    members, info = family_members([esm["small"], esm["large"]], uniref, progress=False)
    assert info["tokens"] == 766 and info["topk"] == 33
    rep = analyse_family(members, info).to_dict()
    (pair,) = rep["pairs"]
    assert pair["llm"] == "esm_large" and pair["acc"]["exact"]
    assert pair["ppl"]["ppl_llm"] == pytest.approx(masked_ppl(members[1].records.logp), rel=1e-9)


def test_masked_lms_refuse_the_accuracy_objective_and_token_rules(esm, uniref):
    with pytest.raises(ArfuseError, match="objective 'accuracy' is for image classifiers"):
        evaluate(EvalConfig(esm["large"], [esm["small"]], uniref, objective="accuracy"), progress=False)
    with pytest.raises(ArfuseError, match="the cosine rule is not applied to masked language models"):
        evaluate(EvalConfig(esm["large"], [esm["small"]], uniref, rule="cosine", rule_params={"power": 1.0}),
                 progress=False)
