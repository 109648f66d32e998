"""Every Python block in README.md and docs/ runs: a doc example that rots fails CI.

Blocks of one page run in order in one namespace, as a reader would paste
them. A block fenced as ```python runs; ```text or ```console does not.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def _blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text(encoding="utf-8"))


def test_there_are_pages_with_examples():
    assert (ROOT / "README.md").exists()
    assert sum(len(_blocks(page)) for page in PAGES) >= 3


@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(p)], ids=lambda p: p.name)
def test_page_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    threads = torch.get_num_threads()
    namespace: dict = {"__name__": f"doc_{page.stem}"}
    try:
        for number, block in enumerate(_blocks(page), start=1):
            exec(compile(block, f"{page.name} block {number}", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)


def test_ci_runs_the_readmes_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = next(line for line in readme.splitlines() if "python -m pytest" in line and "pip install" in line)
    assert command in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
