"""The project's scripts (scripts/NAME.py, not a package) imported as modules, once per test session."""

import functools
import importlib.util
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@functools.cache
def load_script(name: str):
    """scripts/<name>.py as a module (executed once; later calls return the same module)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
