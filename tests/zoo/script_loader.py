"""Load a file under ``scripts/`` as a module (the benchmark scripts are files, not a package)."""
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules[name] = script  # dataclasses resolve their module's namespace while the file runs
    spec.loader.exec_module(script)
    return script
