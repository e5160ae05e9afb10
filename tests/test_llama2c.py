"""llama2.c adapter: checkpoint loading, tokenizer exactness, model cross-checks, errors."""
from __future__ import annotations

import shutil
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arfuse.adapters.llama2c import HEADER, Llama2cConfig, Llama2cLM, read_checkpoint
from arfuse.adapters.llama2c_tokenizer import BOS_ID, MIN_MERGE_SCORE, Llama2cTokenizer
from arfuse.errors import ArfuseError
from arfuse.paths import shared_data_root

DATA = shared_data_root()
STORIES = DATA / "models" / "stories260K" if DATA else None
needs_data = pytest.mark.skipif(STORIES is None or not (STORIES / "stories260K.bin").exists(),
                                reason="shared data (models/stories260K) not found: set ARFUSE_DATA")

# llama2.c's doc/stories260K.md: `./run stories260K.bin -z tok512.bin -t 0.0` (greedy from BOS alone)
PUBLISHED_GREEDY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw "
    "a big, red ball. She wanted to play with it, but it was too high.\nLily's mom said, \"Lily, let's go to the "
    "park.\" Lily was sad and didn't know what to do. She said, \"I want to play with your ball, but I can't find "
    "it.\"\nLily was sad and didn't know what to do. She said, \"I'm sorry, Lily. I didn't know what to do.\"\n"
    "Lily didn't want to help her mom, so she said, \"I'm sorry, mom. I didn't know what to do.\" Her mom said, "
    "\"Don't worry, Lily. We can help you.")

ROUNDTRIP = ["Once upon a time", "", " ", "  two leading spaces", "trailing  ", "a\n\nb  c\t",
             "Lily's mom said, \"Hi!\"", "héllo wörld", "日本語 🙂 naïve café — “quotes”",
             "literal <0x41> and <s> tags", "x" * 300 + " the end"]


@pytest.fixture(scope="module")
def lm(shared_data) -> Llama2cLM:
    return Llama2cLM(str(shared_data / "models" / "stories260K" / "stories260K.bin"))


@pytest.fixture(scope="module")
def lm64(shared_data) -> Llama2cLM:
    """The same model computed in float64: batch shape changes results by ~1e-12 only, so
    masking and position logic can be checked tightly (float32 kernels vary by ~1e-5)."""
    return Llama2cLM(str(shared_data / "models" / "stories260K" / "stories260K.bin"), dtype="float64")


def reference_encode(tok: Llama2cTokenizer, text: str) -> list[int]:
    """A direct transcription of llama2.c's encode (O(n^2) rescans), for short texts."""
    if not text:
        return []
    ids = [tok.piece_to_id[b" "]]
    for ch in text:
        b = ch.encode()
        ids += [tok.piece_to_id[b]] if b in tok.piece_to_id else [x + 3 for x in b]
    while True:
        best_score, best_id, best_idx = MIN_MERGE_SCORE, -1, -1
        for i in range(len(ids) - 1):
            m = tok.piece_to_id.get(tok.pieces[ids[i]] + tok.pieces[ids[i + 1]])
            if m is not None and tok.scores[m] > best_score:
                best_score, best_id, best_idx = tok.scores[m], m, i
        if best_idx == -1:
            return ids
        ids[best_idx:best_idx + 2] = [best_id]


def greedy(lm: Llama2cLM, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens after ``prompt``, one KV-cache step each."""
    logits, past = lm.forward_step(torch.tensor([prompt]))
    out = []
    for _ in range(n):
        out.append(int(logits[0, -1].argmax()))
        logits, past = lm.forward_step(torch.tensor([[out[-1]]]), past)
    return out


def write_random_checkpoint(path, cfg: Llama2cConfig, seed: int = 0) -> None:
    """A random legacy llama2.c checkpoint (negative vocab_size in the header when unshared)."""
    g = np.random.default_rng(seed)
    v = cfg.vocab_size if cfg.shared_classifier else -cfg.vocab_size
    floats = [g.normal(0, 0.3, int(np.prod(s))).astype("<f4") for _, s in cfg.weight_shapes()]
    with open(path, "wb") as f:
        f.write(HEADER.pack(cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, v, cfg.seq_len))
        for a in floats:
            f.write(a.tobytes())


def to_hf(lm: Llama2cLM):
    """transformers' LlamaForCausalLM with the same weights: an independent implementation."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = lm.config
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.seq_len,
        rms_norm_eps=1e-5, tie_word_embeddings=c.shared_classifier,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, attn_implementation="eager"))

    def to_rotate_half(w: torch.Tensor, heads: int) -> torch.Tensor:
        # llama2.c rotates pairs (2i, 2i+1); HF rotates (i, i + hs/2): reorder each head's rows
        return w.view(heads, c.head_size // 2, 2, c.dim).transpose(1, 2).reshape(heads * c.head_size, c.dim)

    m = lm.model
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(m.tok_embeddings.weight)
        for src, dst in zip(m.layers, hf.model.layers):
            dst.input_layernorm.weight.copy_(src.attention_norm.weight)
            dst.post_attention_layernorm.weight.copy_(src.ffn_norm.weight)
            dst.self_attn.q_proj.weight.copy_(to_rotate_half(src.wq.weight, c.n_heads))
            dst.self_attn.k_proj.weight.copy_(to_rotate_half(src.wk.weight, c.n_kv_heads))
            dst.self_attn.v_proj.weight.copy_(src.wv.weight)
            dst.self_attn.o_proj.weight.copy_(src.wo.weight)
            dst.mlp.gate_proj.weight.copy_(src.w1.weight)
            dst.mlp.up_proj.weight.copy_(src.w3.weight)
            dst.mlp.down_proj.weight.copy_(src.w2.weight)
        hf.model.norm.weight.copy_(m.norm.weight)
        hf.lm_head.weight.copy_(m.output.weight)
    return hf.eval()


# ---- tokenizer -------------------------------------------------------------------------
@needs_data
@pytest.mark.parametrize("text", ROUNDTRIP)
def test_roundtrip_and_matches_llama2c(lm, text):
    enc = lm.encode(text)
    assert lm.decode(enc.ids) == text
    assert lm.decode([BOS_ID] + enc.ids) == text
    assert enc.ids == reference_encode(lm.tokenizer, text)


@needs_data
def test_known_tokens(lm):
    enc = lm.encode("Once upon a time")
    assert [lm.tokenizer.pieces[i] for i in enc.ids] == [b" Once", b" upon", b" a", b" time"]
    assert enc.ends == [4, 9, 11, 16]
    # "日" is not in tok512: three byte-fallback tokens, only the last one closes the character
    enc = lm.encode("日")
    assert enc.ids == [lm.tokenizer.piece_to_id[b" "], 0xE6 + 3, 0x97 + 3, 0xA5 + 3]
    assert enc.ends == [0, 0, 0, 1]  # the dummy-prefix space alone closes nothing


@needs_data
@pytest.mark.parametrize("text", [t for t in ROUNDTRIP if t])
def test_ends_are_utf8_byte_boundaries(lm, text):
    enc = lm.encode(text)
    nbytes = np.cumsum([len(lm.tokenizer.raw[i]) for i in enc.ids]) - 1  # text bytes covered, less the dummy space
    char_end_bytes = np.cumsum([len(c.encode()) for c in text])
    expected = [int(np.searchsorted(char_end_bytes, b, side="right")) for b in nbytes]
    assert enc.ends == expected
    assert enc.ends[-1] == len(text) and all(a <= b for a, b in zip(enc.ends, enc.ends[1:]))


@needs_data
@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("aeinorst hHTlw,.'\n\t  éü日🙂<>0x")), max_size=60))
def test_chunked_heap_encode_equals_llama2c_loop(lm, text):
    assert lm.encode(text).ids == reference_encode(lm.tokenizer, text)


@needs_data
def test_long_text_equals_llama2c_loop_and_is_fast(lm):
    import time

    text = (DATA / "text" / "tinyshakespeare.txt").read_text()
    assert lm.encode(text[:3000]).ids == reference_encode(lm.tokenizer, text[:3000])
    t0 = time.perf_counter()
    enc = lm.encode(text)
    assert time.perf_counter() - t0 < 20
    assert len(enc.ids) == len(enc.ends) and enc.ends[-1] == len(text)
    assert lm.decode(enc.ids) == text


# ---- model -----------------------------------------------------------------------------
@needs_data
def test_info(lm):
    assert lm.info.kind == "llama2c" and lm.info.name == "stories260K"
    assert lm.info.num_parameters == 260_032  # header's weights, freq_cis tables excluded
    assert (lm.info.vocab_size, lm.info.max_length) == (512, 512)
    assert set(lm.info.identity) == {"path", "sha256", "tokenizer_sha256"}
    assert lm.tokenizer_fingerprint() == lm.info.identity["tokenizer_sha256"]
    assert (lm.bos_id, lm.eos_id, lm.uses_bos("auto")) == (1, 2, True)


@needs_data
def test_greedy_from_bos_matches_llama2c_published_sample(lm):
    text = lm.decode([BOS_ID] + greedy(lm, [BOS_ID], 100))
    assert len(text) > 250 and PUBLISHED_GREEDY.startswith(text)


@needs_data
def test_greedy_story(lm):
    prompt = [BOS_ID] + lm.encode("Once upon a time").ids
    out = greedy(lm, prompt, 60)
    # verified against llama2.c's published greedy sample and against transformers (below)
    assert out[:10] == [432, 383, 286, 261, 376, 298, 315, 421, 395, 317]
    text = lm.decode(prompt + out)
    assert text.startswith("Once upon a time, there was a little girl named Lily.")
    words = text.lower().replace(",", " ").replace(".", " ").split()
    assert text.isascii() and sum(w.isalpha() for w in words) > 0.8 * len(words)
    assert {"the", "was", "she", "to"} <= set(words)


@needs_data
def test_matches_transformers_llama(lm):
    hf = to_hf(lm)
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.tensor([[BOS_ID] + lm.encode(PUBLISHED_GREEDY).ids[:199]]),
                     torch.randint(3, 512, (1, 200), generator=g)])
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    assert (lm.forward_logits(ids) - ref).abs().max().item() < 1e-4


def test_unshared_classifier_matches_transformers(tmp_path):
    cfg = Llama2cConfig(dim=32, hidden_dim=40, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, seq_len=64,
                        shared_classifier=False)
    write_random_checkpoint(tmp_path / "m.bin", cfg)
    chars = [bytes([c]) for c in b" abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMN"]
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % b for b in range(256)] + chars  # 300 tokens
    with open(tmp_path / "tok300.bin", "wb") as f:
        f.write(struct.pack("<i", 1))
        for i, p in enumerate(pieces):
            f.write(struct.pack("<fi", -float(i), len(p)) + p)
    lm = Llama2cLM(str(tmp_path / "m.bin"))
    _, w = read_checkpoint(tmp_path / "m.bin")
    assert torch.equal(lm.model.output.weight, w["wcls"]) and not torch.equal(w["wcls"], w["token_embedding"])
    assert lm.info.num_parameters == sum(t.numel() for t in w.values())
    ids = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = to_hf(lm)(input_ids=ids).logits
    assert (lm.forward_logits(ids) - ref).abs().max().item() < 1e-4
    assert lm.decode(lm.encode("Hi, there.").ids) == "Hi, there."


@needs_data
@pytest.mark.parametrize("dtype, tol", [("float64", 1e-9), ("float32", 5e-5)])
def test_left_padding_equals_batch_of_one(lm, lm64, dtype, tol):
    m = lm64 if dtype == "float64" else lm
    a = [BOS_ID] + m.encode("Once upon a time, there was a cat named Tom.").ids
    b = [BOS_ID] + m.encode("The sun was hot.").ids
    pad = len(a) - len(b)
    ids = torch.tensor([a, [0] * pad + b])
    mask = torch.tensor([[1] * len(a), [0] * pad + [1] * len(b)])
    both = m.forward_logits(ids, mask)
    assert torch.isfinite(both).all()
    assert (both[0] - m.forward_logits(torch.tensor([a]))[0]).abs().max().item() < tol
    assert (both[1, pad:] - m.forward_logits(torch.tensor([b]))[0]).abs().max().item() < tol


@needs_data
@pytest.mark.parametrize("dtype, tol", [("float64", 1e-9), ("float32", 5e-5)])
def test_kv_cache_steps_equal_full_forward(lm, lm64, dtype, tol):
    m = lm64 if dtype == "float64" else lm
    a = [BOS_ID] + m.encode("Once upon a time, there was a cat.").ids
    b = [BOS_ID] + m.encode("Tom ran.").ids
    pad = len(a) - len(b)
    ids = torch.tensor([a, [0] * pad + b])
    mask = torch.tensor([[1] * len(a), [0] * pad + [1] * len(b)])
    full = m.forward_logits(ids, mask)
    first, past = m.forward_step(ids[:, :10], attention_mask=mask[:, :10])
    steps = [first]
    for t in range(10, ids.shape[1]):
        logits, past = m.forward_step(ids[:, t:t + 1], past)
        steps.append(logits)
    assert (torch.cat(steps, dim=1) - full)[mask.bool()].abs().max().item() < tol
    tail = m.forward_logits_tail(ids[:1], 3)
    assert (tail - m.forward_logits(ids[:1])[:, -3:]).abs().max().item() < tol


@needs_data
def test_logprobs_normalised(lm):
    ids = torch.tensor([[BOS_ID] + lm.encode("She was happy.").ids])
    lp = lm.logprobs(ids)
    assert lp.dtype == torch.float32 and lp.shape == (1, ids.shape[1], 512)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(1, ids.shape[1]), atol=1e-5)


@needs_data
def test_context_limit_is_an_error(lm):
    with pytest.raises(ArfuseError, match="windows of at most 512"):
        lm.forward_logits(torch.ones(1, 513, dtype=torch.long))


# ---- errors ----------------------------------------------------------------------------
def test_missing_checkpoint(tmp_path):
    with pytest.raises(ArfuseError, match="does not exist"):
        Llama2cLM(str(tmp_path / "nope.bin"))


@needs_data
def test_truncated_checkpoint_says_expected_and_actual_bytes(tmp_path):
    data = (STORIES / "stories260K.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:-100])
    with pytest.raises(ArfuseError, match=r"expected 1,056,540 bytes, found 1,056,440"):
        Llama2cLM(str(tmp_path / "cut.bin"), tokenizer=str(STORIES / "tok512.bin"))


def test_versioned_export_is_refused(tmp_path):
    (tmp_path / "v1.bin").write_bytes(struct.pack("<Ii", 0x616B3432, 1) + bytes(256))
    with pytest.raises(ArfuseError, match="--version 0"):
        Llama2cLM(str(tmp_path / "v1.bin"))


@needs_data
def test_missing_tokenizer_names_places_and_fix(tmp_path):
    shutil.copy(STORIES / "stories260K.bin", tmp_path / "m.bin")
    with pytest.raises(ArfuseError, match=r"tok512\.bin and .*tokenizer\.bin.*tokenizer="):
        Llama2cLM(str(tmp_path / "m.bin"))
    lm = Llama2cLM(str(tmp_path / "m.bin"), tokenizer=str(STORIES / "tok512.bin"))
    assert lm.info.vocab_size == 512


@needs_data
def test_tokenizer_of_other_vocab_size_is_refused():
    with pytest.raises(ArfuseError, match="larger vocabulary"):
        Llama2cTokenizer.from_file(STORIES / "tok512.bin", 300)
    with pytest.raises(ArfuseError, match="ends after 512 of the model's 600 tokens"):
        Llama2cTokenizer.from_file(STORIES / "tok512.bin", 600)
