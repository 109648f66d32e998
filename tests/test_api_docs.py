"""The API pages in docs/api are generated from the docstrings, and must not go stale."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

import rdl_functional as rf

ROOT = Path(__file__).resolve().parent.parent
API = ROOT / "docs" / "api"
FIX = "run `python docs/build_api.py` and commit docs/api"


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_api", ROOT / "docs" / "build_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_api = _load_builder()
PAGES = build_api.generate()


def test_no_api_page_is_missing_or_left_over():
    committed = sorted(path.name for path in API.glob("*.md"))
    assert committed == sorted(PAGES), f"docs/api holds {committed} but the generator writes {sorted(PAGES)}: {FIX}"


@pytest.mark.parametrize("name", sorted(PAGES))
def test_api_page_is_up_to_date(name):
    path = API / name
    assert path.exists(), f"docs/api/{name} is missing: {FIX}"
    assert path.read_text(encoding="utf-8") == PAGES[name], f"docs/api/{name} is stale: {FIX}"


def test_every_public_name_has_an_api_entry():
    headings = {heading for text in PAGES.values() for heading in re.findall(r"^## `([^`]+)`$", text, re.MULTILINE)}
    missing = sorted(set(rf.__all__) - headings)
    assert not missing, f"rdl_functional.__all__ names without an API entry: {missing} (add their module to MODULES)"


def test_api_pages_hold_no_block_that_the_docs_test_would_run():
    for name, text in PAGES.items():
        assert "```python" not in text, f"docs/api/{name} has a ```python fence; examples belong in ```pycon"


def test_docstring_examples_become_pycon_blocks():
    converted = build_api.markdown("Add.\n\n>>> 1 + 1\n2\n\nDone.", {})
    assert converted == "Add.\n\n```pycon\n>>> 1 + 1\n2\n```\n\nDone."


def test_the_lazily_loaded_names_are_the_real_objects_and_importing_the_core_leaves_them_unloaded():
    import subprocess
    import sys

    import rdl_functional as rf
    from rdl_functional import testing
    from rdl_functional.apps import disc as experiment

    assert rf.run_disc is experiment.run_disc and rf.check_vjp is testing.check_vjp
    assert set(rf.__all__) <= set(dir(rf))
    code = ("import sys, rdl_functional as rf\n"
            "assert not {'rdl_functional.apps.disc', 'rdl_functional.apps.plots', 'rdl_functional.testing'} "
            "& set(sys.modules), sorted(m for m in sys.modules if m.startswith('rdl_functional'))\n"
            "rf.save\n"
            "assert 'rdl_functional.io' in sys.modules\n"
            "try:\n    rf.no_such_name\nexcept AttributeError as e:\n    assert 'no_such_name' in str(e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
