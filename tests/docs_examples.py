"""Runs the ```python blocks of docs/integrations/*.md (imported by tests)."""

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs" / "integrations"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(name: str) -> list[str]:
    """The ```python blocks of docs/integrations/<name>.md, in order."""
    blocks = _BLOCK.findall((DOCS / f"{name}.md").read_text())
    assert blocks, f"docs/integrations/{name}.md has no python example"
    return blocks


def run_doc(name: str, tmp_path, monkeypatch) -> dict:
    """Executes the page's examples in one namespace, inside tmp_path."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{name}"}
    for block in python_blocks(name):
        exec(compile(block, str(DOCS / f"{name}.md"), "exec"), namespace)
    return namespace
