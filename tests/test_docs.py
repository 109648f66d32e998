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


def _free_names(block: str) -> set[str]:
    """The names a block reads that it neither assigns, imports nor finds among the builtins."""
    import ast
    import builtins

    tree = ast.parse(block)
    read, bound = set(), set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return read - bound


@pytest.mark.parametrize("name", ["images.md", "sequences.md", "adder.md"])
def test_a_block_that_needs_the_one_above_says_it_continues_it(name):
    text = (ROOT / "docs" / name).read_text(encoding="utf-8")
    starts = [match.start() for match in BLOCK.finditer(text)]
    for number, (start, block) in enumerate(zip(starts, _blocks(ROOT / "docs" / name), strict=True), start=1):
        before = text[text.rfind("```", 0, start - 1) + 3 if number > 1 else 0:start]
        free = _free_names(block)
        assert not free or "continues the" in before, f"{name} block {number} reads {sorted(free)} from elsewhere"


def test_the_user_docs_name_no_issue_numbers_and_no_private_attributes():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        assert "issue 18" not in text and "._flat" not in text, page.name
