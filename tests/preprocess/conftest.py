"""Loads ``reference.py`` as the module ``preprocess_reference``.

Test folders here have no ``__init__.py``, so a plain ``import reference`` would share one module name
with any other folder's ``reference.py``; a distinct name keeps the suites independent.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_NAME = "preprocess_reference"

if _NAME not in sys.modules:
    _spec = importlib.util.spec_from_file_location(_NAME, Path(__file__).with_name("reference.py"))
    if _spec is None or _spec.loader is None:
        raise ImportError("cannot load tests/preprocess/reference.py")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[_NAME] = _module
    _spec.loader.exec_module(_module)
