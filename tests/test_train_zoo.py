"""The zoo recipe: sweeps, config includes, skipping finished models; the repository's recipes parse."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from arfuse.errors import ArfuseError
from arfuse.train.zoo import build_zoo, read_zoo

ROOT = Path(__file__).resolve().parent.parent
TEXT = "and the spirit of god moved upon the face of the waters\nand god said let there be light\n" * 60


def _recipe(tmp_path: Path) -> Path:
    (tmp_path / "train.txt").write_text(TEXT)
    (tmp_path / "base.toml").write_text('tokenizer = "word"\nembed_size = 8\nhidden_size = 8\nlr = 0.01\n')
    zoo = tmp_path / "zoo.toml"
    zoo.write_text(f"""
[zoo]
out = "{tmp_path / 'runs'}"
[defaults]
threads = 1
data = "{tmp_path / 'train.txt'}"
max_steps = 6
eval_every = 3
block_size = 8
batch_size = 4
[[model]]
name = "w-{{arch}}-e{{embed_size}}"
config = "base.toml"
arch = ["lstm", "gru"]
embed_size = [8, 16]
[[model]]
name = "t"
config = "base.toml"
arch = "transformer-small"
n_heads = 2
""")
    return zoo


def test_zoo_sweeps_builds_and_skips(tmp_path):
    zoo = _recipe(tmp_path)
    entries = read_zoo(zoo)
    assert [e.name for e in entries] == ["w-lstm-e8", "w-gru-e8", "w-lstm-e16", "w-gru-e16", "t"]
    assert [e.config.embed_size for e in entries] == [8, 8, 16, 16, 8]
    assert all(e.config.lr == 0.01 and e.config.tokenizer == "word" for e in entries)
    assert entries[4].config.block_size == 8 and entries[4].config.n_layers == 1  # defaults over the preset
    first = build_zoo(zoo, only=["w-gru-e8", "t"], progress=False, log=lambda *a: None)
    assert [r["name"] for r in first] == ["w-gru-e8", "t"] and not any(r["already_done"] for r in first)
    again = build_zoo(zoo, only=["w-gru-e8"], progress=False, log=lambda *a: None)
    assert again[0]["already_done"] and again[0]["val_loss"] == first[0]["val_loss"]
    summary = json.loads((tmp_path / "runs" / "zoo.json").read_text())
    assert summary["t"]["steps"] == 6 and summary["w-gru-e8"]["seconds"] == first[0]["seconds"]


def test_zoo_errors(tmp_path):
    zoo = tmp_path / "z.toml"
    zoo.write_text('[[model]]\nname = "a-{arch}"\narch = ["lstm", "lstm"]\ndata = "kjv"\n')
    with pytest.raises(ArfuseError, match=r"two models are named 'a-lstm'"):
        read_zoo(zoo)
    zoo.write_text('[[model]]\nname = "a"\narch = "lstm"\ndata = "kjv"\nembed = 3\n')
    with pytest.raises(ArfuseError, match=r"unknown training option 'embed'.*Did you mean .*'embed_size'"):
        read_zoo(zoo)
    zoo.write_text('[[model]]\nname = "a"\narch = "lstm"\ndata = "kjv"\n')
    with pytest.raises(ArfuseError, match=r"--only 'b': no such entry"):
        build_zoo(zoo, only=["b"], log=lambda *a: None)


def test_repository_recipes_parse():
    entries = read_zoo(ROOT / "configs" / "zoo.toml")
    names = [e.name for e in entries]
    assert "kjv-smollm2-2l256" in names and "kjv-gpt2-2l192" in names and len(names) == 15
    acc = next(e.config for e in entries if e.name == "kjv-smollm2-2l256")
    assert (acc.tokenizer, acc.data, acc.block_size, acc.max_minutes) == ("smollm2-135m", "kjv[:90%]", 1024, 30)
    wiki = next(e.config for e in entries if e.name == "enwiki-smollm2-2l256")
    assert wiki.valid is None and wiki.data == "enwiki"
    from arfuse.train.demo import DEMO_RECIPE

    demo = next(e.config for e in entries if e.name == "kjv-smollm2-2l256-demo")
    assert all(getattr(demo, k) == v for k, v in DEMO_RECIPE.items())


def test_only_accepts_repeats_and_commas():
    from arfuse.cli.train import _names

    assert _names(["a,b", "c", " d , "]) == ["a", "b", "c", "d"] and _names(None) is None
