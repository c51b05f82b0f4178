"""Load a file under ``scripts/`` as a module (the benchmark scripts are files, not a package)."""
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script
