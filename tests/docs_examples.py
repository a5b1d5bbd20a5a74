"""Runs the ```python blocks of docs/integrations/*.md and other pages of docs/ (imported by tests)."""

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs" / "integrations"
ROOT = DOCS.parent
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(name: str, folder: Path = DOCS) -> list[str]:
    """The ```python blocks of <folder>/<name>.md (docs/integrations by default), in order."""
    blocks = _BLOCK.findall((folder / f"{name}.md").read_text())
    assert blocks, f"{folder / name}.md has no python example"
    return blocks


def run_doc(name: str, tmp_path, monkeypatch, folder: Path = DOCS) -> dict:
    """Executes the page's examples in one namespace, inside tmp_path."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{name}"}
    for block in python_blocks(name, folder):
        exec(compile(block, str(folder / f"{name}.md"), "exec"), namespace)
    return namespace
