"""Load a script that is not a package module (a benchmark under benchmarks/) as a module, for its tests."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType


@contextmanager
def script_module(path: Path) -> Iterator[ModuleType]:
    """The script at `path` imported under its file name (registered in sys.modules while in use: dataclasses look
    their module up), removed again afterwards."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
