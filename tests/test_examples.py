"""Every notebook in examples/ executes from top to bottom without an error (nbclient, the
`python3` kernel of this environment), in a scratch working directory, and shows a figure or a
table at the end; the top-level README links each one."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))


def test_examples_exist_and_the_readme_links_each() -> None:
    """The five notebooks are numbered in reading order (NN_name.ipynb, distinct numbers), and
    the README links each one."""
    assert len(NOTEBOOKS) == 5, NOTEBOOKS  # one per stage of the path
    numbers = [int(p.name[:2]) for p in NOTEBOOKS]
    assert numbers == sorted(set(numbers)) and all(p.name[2] == "_" for p in NOTEBOOKS)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for path in NOTEBOOKS:
        assert f"(examples/{path.name})" in readme, path.name


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_example_notebook_executes(path: Path, tmp_path: Path) -> None:
    """The notebook runs without an error, and its last code cell shows something: printed
    text, a table or an image."""
    notebook = nbformat.read(path, as_version=4)
    assert not any(c.get("outputs") for c in notebook.cells if c.cell_type == "code"), (
        f"{path.name} is committed with outputs; clear them"
    )
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    last = [c for c in notebook.cells if c.cell_type == "code"][-1]
    kinds = {o.output_type for o in last.outputs}
    assert kinds & {"stream", "display_data", "execute_result"}, last.outputs
