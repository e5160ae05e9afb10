"""The README's Python API examples run and print what the README shows under each of them."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _examples() -> list[tuple[str, str]]:
    text = README.read_text(encoding="utf-8")
    start = text.index("### Python API")
    section = text[start:text.index("\n## ", start)]
    blocks = re.findall(r"```(python|text)\n(.*?)```", section, flags=re.S)
    pairs = []
    for (kind, code), (next_kind, shown) in zip(blocks, blocks[1:]):
        if kind == "python" and next_kind == "text":
            pairs.append((code, shown.rstrip("\n")))
    return pairs


def test_readme_has_python_api_examples():
    assert len(_examples()) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(_examples())))
def test_readme_python_example_prints_what_it_shows(i, tmp_path):
    code, shown = _examples()[i]
    script = tmp_path / f"example_{i}.py"
    script.write_text(code, encoding="utf-8")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                         cwd=README.parent, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_output(run.stdout.rstrip("\n"), shown)


NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.(\d+))?")


def assert_same_output(got: str, shown: str) -> None:
    """The same text, number for number, each decimal within 2 units of its last printed digit: float
    sums end a digit apart across CPUs and library releases (-206.342% printed as -206.343% with
    transformers 5.25 on another CPU), while a real change moves a figure by more."""
    assert NUMBER.sub("#", got) == NUMBER.sub("#", shown), f"{got}\n!=\n{shown}"
    for a, b in zip(NUMBER.finditer(got), NUMBER.finditer(shown)):
        if b.group(1) is None:   # an integer (a count, an id) must match exactly
            assert a.group(0) == b.group(0), f"{a.group(0)} != {b.group(0)} in\n{got}"
        else:
            unit = 10.0 ** -len(b.group(1))
            x, y = float(a.group(0).replace(",", "")), float(b.group(0).replace(",", ""))
            assert abs(x - y) <= 2 * unit + 1e-12, f"{a.group(0)} != {b.group(0)} (beyond 2 units of the last digit) in\n{got}"


def test_outputs_compare_number_for_number():
    assert_same_output("w = 0.9973: x -206.343%  4,467 segments", "w = 0.9973: x -206.342%  4,467 segments")
    for bad in ("w = 0.9973: x -206.352%  4,467 segments", "w = 0.9973: x -206.343%  4,468 segments",
                "w = 0.9973: y -206.342%  4,467 segments", "w = 0.9973: x -206.342%"):
        with pytest.raises(AssertionError):
            assert_same_output(bad, "w = 0.9973: x -206.342%  4,467 segments")
