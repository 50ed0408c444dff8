"""The README's examples run as written, and its headline table is the one rendered from the
recorded results (so it cannot drift from paper_figs/results)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from paper_figs import readme
from paper_figs.common import RESULTS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("index", range(len(re.findall(r"```python\n", README))))
def test_python_examples_run(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the optimizer example saves a file
    example = re.findall(r"```python\n(.*?)```", README, re.S)[index]
    exec(compile(example, f"README.md example {index}", "exec"), {})


def test_headline_is_rendered_from_the_recorded_results():
    begin, end = README.index(readme.HEADLINE_BEGIN), README.index(readme.HEADLINE_END)
    assert README[begin + len(readme.HEADLINE_BEGIN):end].strip("\n") == readme.headline(RESULTS)
    assert readme.with_headline(README, readme.headline(RESULTS)) == README


def test_headline_markers_are_required():
    with pytest.raises(ValueError, match="headline markers"):
        readme.with_headline("# a README without them\n", "| table |")
