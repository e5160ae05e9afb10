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
    assert run.stdout.rstrip("\n") == shown
