"""Load the repository's entry-point scripts (jobs/, scripts/) as modules, for tests that call their main()."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(rel_path: str) -> ModuleType:
    """``rel_path`` (e.g. ``jobs/analyze.py``) executed as a fresh module."""
    path = REPO / rel_path
    spec = importlib.util.spec_from_file_location(path.stem + "_script", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
