"""The notebooks as stored: no outputs or execution counts in git, the python3 kernel, and each reads
as a paper section whose answer is checked by asserts. (`pytest` also executes them, via nbmake.)"""
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


def test_the_four_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01_codes.ipynb", "02_outliers.ipynb", "03_optimizer_states.ipynb",
                                          "04_four_bit_states.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {i} has outputs: clear them before committing"
            assert cell.execution_count is None, f"cell {i} has an execution count: clear outputs before committing"
        assert "attachments" not in cell or not cell.attachments, f"cell {i} has attachments"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_reads_as_a_section_with_checked_answers(path):
    nb = nbformat.read(path, as_version=4)
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    for part in ("**Question.**", "## Method", "## Result", "## Answer"):
        assert part in markdown, f"{path.name} lacks {part}"
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    assert "from quantlab import analysis as A" in code[0]
    assert "assert " in code[-1], "the last cell should check the answer's claims"
