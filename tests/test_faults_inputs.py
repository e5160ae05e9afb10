"""Faulty inputs give one line that names the file or value and the fix (issue 21): data that is not
UTF-8, bad GGUF files, transformers' noise at conversion and model calls, prompts longer than a
model's context (refused before any model runs and before the CLI echoes them)."""
from __future__ import annotations

import bz2
import json
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import TRAIN_TEXT

from arfuse.adapters.hf import HFCausalLM
from arfuse.cli.main import main
from arfuse.errors import ArfuseError


@pytest.fixture(scope="module", autouse=True)
def _no_hf_bars():
    # transformers was imported (by conftest) before main() could set HF_HUB_DISABLE_PROGRESS_BARS: its
    # per-load bars would land on stderr in-process (a fresh `arfuse` process shows none)
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    yield
    if was:
        hf_logging.enable_progress_bar()


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(err: str) -> str:
    assert err.strip() and "\n" not in err.strip(), f"not one line on stderr: {err!r}"
    assert "Traceback" not in err
    return err.strip()


# ---- 3. data that is not UTF-8 ------------------------------------------------------------------
@pytest.fixture
def bad_text_files(tmp_path) -> dict[str, Path]:
    files = {
        "latin1": (tmp_path / "latin1.txt", "The café is open.\nNaïve.\n".encode("latin-1")),
        "utf16": (tmp_path / "utf16.txt", "hello world\n".encode("utf-16")),   # starts with \xff\xfe
        "binary": (tmp_path / "blob.txt", bytes(range(256)) * 4),
        "jsonl": (tmp_path / "docs.jsonl", b'{"text": "fine"}\n\n{"text": "caf\xe9"}\n'),
    }
    for path, data in files.values():
        path.write_bytes(data)
    return {k: p for k, (p, _) in files.items()}


def test_not_utf8_data_api(bad_text_files, tmp_path):
    from arfuse.data.text import load_dataset, read_jsonl

    with pytest.raises(ArfuseError) as e:
        load_dataset(str(bad_text_files["latin1"]))
    msg = str(e.value)
    assert str(bad_text_files["latin1"]) in msg and "byte offset 7" in msg and "b'\\xe9'" in msg
    assert "iconv -f latin1 -t utf-8" in msg and "not a text file" in msg
    with pytest.raises(ArfuseError, match=r"byte offset 0 .*b'\\xff'.*UTF-16.*iconv -f utf-16 -t utf-8"):
        load_dataset(str(bad_text_files["utf16"]))
    with pytest.raises(ArfuseError, match=r"blob\.txt: not UTF-8 text: byte offset 128 .*binary file"):
        load_dataset(str(bad_text_files["binary"]))
    # JSON lines: the line and the offset in the file (lambada and multiple-choice files read them alike)
    with pytest.raises(ArfuseError, match=r"docs\.jsonl: not UTF-8 text: byte offset 31 \(line 3\) holds b'\\xe9'"):
        list(read_jsonl(bad_text_files["jsonl"]))
    packed = tmp_path / "packed.txt.bz2"
    packed.write_bytes(bz2.compress(b"ok\nthen \xff here\n"))
    with pytest.raises(ArfuseError, match=r"byte offset 8 of the decompressed text \(line 2\) holds b'\\xff'"):
        load_dataset(str(packed))
    # a UTF-8 file still reads as before (newlines as open() reads them)
    good = tmp_path / "good.txt"
    good.write_bytes("a\r\nb café\n".encode())
    assert load_dataset(str(good)).documents == ["a\nb café\n"]


def test_not_utf8_data_cli(bad_text_files, tiny_models, capsys):
    for kind, path in bad_text_files.items():
        rc, _, err = run_cli(capsys, "score", tiny_models["large"], str(path), "--quiet")
        assert rc == 2, (kind, err)
        line = one_line(err)
        assert line.startswith(f"arfuse score: error: {path}: not UTF-8 text: byte offset "), line
    rc, _, err = run_cli(capsys, "eval", "--large", tiny_models["large"], "--small", tiny_models["small"],
                           "--data", str(bad_text_files["latin1"]), "--weight", "0.5", "--quiet")
    assert rc == 2
    line = one_line(err)
    assert str(bad_text_files["latin1"]) in line and "byte offset 7" in line and "iconv" in line


# ---- 4. bad GGUF files --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory) -> dict[str, Path]:
    import gguf
    root = tmp_path_factory.mktemp("gguf")
    full = root / "whole.gguf"
    w = gguf.GGUFWriter(str(full), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_tensor("token_embd.weight", np.ones((32, 8), dtype=np.float32))
    w.add_tensor("output.weight", np.ones((32, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = full.read_bytes()
    out = {"whole": full}
    for name, blob in {"cut_tensors": data[:len(data) - 600], "cut_header": data[:40], "text": b"not a model\n",
                       "empty": b""}.items():
        out[name] = root / f"{name}.gguf"
        out[name].write_bytes(blob)
    return out


@pytest.mark.parametrize("kind", ["cut_tensors", "cut_header", "text", "empty"])
def test_bad_gguf(gguf_files, kind, text_file, capsys):
    from arfuse.adapters import load_model
    from arfuse.adapters.hf import load_hf_tokenizer

    path = gguf_files[kind]
    size = f"{path.stat().st_size:,} bytes"
    with pytest.raises(ArfuseError) as e:
        load_model(str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path}: truncated or not a GGUF file (") and size in msg and "re-download" in msg
    with pytest.raises(ArfuseError, match="truncated or not a GGUF file"):
        load_hf_tokenizer(str(path))
    rc, _, err = run_cli(capsys, "score", str(path), text_file, "--quiet")
    assert rc == 2
    line = one_line(err)
    assert line.startswith(f"arfuse score: error: {path}: truncated or not a GGUF file (") and size in line


def test_gguf_transformers_cannot_convert(gguf_files, capsys):
    """A whole GGUF file transformers fails to convert (no tokenizer, a bad config): one line, not its traceback."""
    from arfuse.adapters import load_model

    path = gguf_files["whole"]
    with pytest.raises(ArfuseError, match=rf"^{path}: transformers cannot convert this GGUF file \(.+\): give"):
        load_model(str(path))


# ---- 7. noise -----------------------------------------------------------------------------------
def test_conversion_bars_silenced(capsys):
    import transformers.modeling_gguf_pytorch_utils as mod
    import transformers.utils.logging as hf_logging

    from arfuse.adapters import hf
    assert hf._show_conversion_progress() is False        # stderr is not a terminal under pytest
    hf.set_conversion_progress(True)
    try:
        assert hf._show_conversion_progress() is True
    finally:
        hf.set_conversion_progress(None)
    was_bar, was_enabled = mod.tqdm, hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    try:
        with hf._gguf_conversion(Path("x.gguf")):
            for _ in mod.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
                pass
            for _ in hf_logging.tqdm(range(3), desc="Loading weights"):
                pass
        assert capsys.readouterr().err == ""
        assert mod.tqdm is was_bar and hf_logging.is_progress_bar_enabled()
    finally:
        if not was_enabled:
            hf_logging.disable_progress_bar()


def test_no_cache_deprecation_noise(tiny_pair):
    """transformers warns (FutureWarning and a logged line) when a KV cache is passed as past_key_values;
    arfuse's own step calls pass it by the name the installed transformers takes."""
    import torch
    import transformers.utils.logging as hf_logging

    large, _ = tiny_pair
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    root = logging.getLogger("transformers")
    handler, level = Keep(), root.level
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    hf_logging.warning_once.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, past = large.forward_step(torch.tensor([[5, 6, 7]]))
            logits2, past = large.forward_step(torch.tensor([[8]]), past)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    noise = [str(w.message) for w in caught] + records
    assert not [m for m in noise if "past_key_values" in m or "cache_params" in m], noise
    full = large.forward_logits(torch.tensor([[5, 6, 7, 8]]))
    torch.testing.assert_close(logits2[0, -1], full[0, -1], atol=1e-4, rtol=1e-4)


# ---- 9. prompts longer than a context: refused before any model call, before any echo ------------
@pytest.fixture
def count_calls(monkeypatch):
    calls: list[str] = []
    for name in ("forward_step", "forward_logits", "forward_logits_tail"):
        orig = getattr(HFCausalLM, name)

        def counted(self, *a, _orig=orig, _name=name, **kw):
            calls.append(_name)
            return _orig(self, *a, **kw)

        monkeypatch.setattr(HFCausalLM, name, counted)
    return calls


@pytest.fixture(scope="module")
def short_small(tiny_models, tmp_path_factory) -> str:
    """The tiny small model with a context of 64 tokens (the large one has 256)."""
    folder = tmp_path_factory.mktemp("short") / "small64"
    shutil.copytree(tiny_models["small"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["max_position_embeddings"] = 64
    (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder)


LONG = TRAIN_TEXT[:400]   # about 100 tokens: fits the large model's 256, not the short small model's 64


@pytest.mark.parametrize("how", [{"weight": 0.5}, {"weight": 0.5, "speculative": 2},
                                 {"weight": 0.5, "rule": "union", "topk": 8}, {"strategy": "segment"}])
def test_long_prompt_refused_before_any_model_call(tiny_models, short_small, count_calls, how):
    from arfuse.adapters import load_model
    from arfuse.generation.api import generate

    large = load_model(tiny_models["large"])
    small = load_model(short_small)
    assert large.info.max_length == 256 and small.info.max_length == 64
    with pytest.raises(ArfuseError, match=r"prompt 2 of 2 \(\d+ tokens\) plus 4 new tokens.* exceeds small64's "
                                          r"context of 64 tokens: shorten the prompt"):
        generate(["hi", LONG], large=large, small=small, max_new_tokens=4, **how)
    assert count_calls == []
    # both fit with truncate="left", the output as long as asked
    out = generate(["hi", LONG], large=large, small=small, max_new_tokens=4, truncate="left", **how)
    assert count_calls and all(len(r.token_ids) <= 4 for r in out)


def test_long_prompt_cli_nothing_echoed(tiny_models, short_small, count_calls, capsys):
    rc, out, err = run_cli(capsys, "generate", LONG, "--large", tiny_models["large"], "--small", short_small,
                           "--weight", "0.5", "--max-new-tokens", "4")
    assert rc == 2 and out == "" and count_calls == []
    line = one_line(err)
    assert line.startswith("arfuse generate: error: prompt (") and "exceeds small64's context of 64 tokens" in line
    assert "--truncate left" in line
    # a prompt that fits still echoes and generates
    rc, out, err = run_cli(capsys, "generate", "The quick", "--large", tiny_models["large"], "--small", short_small,
                           "--weight", "0.5", "--max-new-tokens", "3")
    assert rc == 0 and out.startswith("The quick") and count_calls


def test_malformed_slices_and_percent_bounds_of_a_one_line_file(tmp_path, capsys):
    """A slice that is not [a:b] is said to be malformed (not a missing file); percentage bounds in a
    file without line starts after them stay where they fall instead of snapping to the end."""
    from arfuse.cli.main import main
    from arfuse.data.text import load_dataset

    one = tmp_path / "one.txt"
    one.write_text("word " * 140)
    for tail in ("[7]", "[::4]", "[40%]", "[]"):
        assert main(["score", "x", f"{one}{tail}"]) == 2
        err = capsys.readouterr().err
        assert "malformed" in err and "[a:b]" in err and "does not exist" not in err
    d = load_dataset(f"{one}[21%:100%]")
    assert d.char_range == (147, 700) and d.documents[0] == ("word " * 140)[147:]
