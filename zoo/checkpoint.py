"""Safe, atomic reading and writing of weights and JSON.

Everything is written to a temporary file in the destination folder and renamed into place, so a
crash never leaves a half-written file. Only safetensors are read: nothing is ever unpickled.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import safetensors.torch
import torch
from torch import nn


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and rename the result onto ``path`` (same folder, so the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the final file the usual permissions
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    return atomic_write(path, write)


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON (corrupt or truncated?): {e}") from None


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata))


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing, truncated or corrupt file is one clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    try:
        return safetensors.torch.load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types for bad headers and short files
        raise ValueError(f"checkpoint file {path} is corrupt or truncated ({type(e).__name__}: {e})") from None


def save_module(path: str | os.PathLike, module: nn.Module, metadata: dict[str, str] | None = None) -> Path:
    """Save a module's weights; tied (shared) tensors are stored once."""
    return atomic_write(path, lambda tmp: safetensors.torch.save_model(module, tmp, metadata=metadata))


def load_module(path: str | os.PathLike, module: nn.Module, what: str = "model") -> None:
    """Load weights into ``module`` strictly; a file of another architecture is a clear ValueError."""
    state = load_tensors(path)
    expected = module.state_dict()
    # tied weights are stored under one of their names: fill the aliases from it
    for name, tensor in expected.items():
        if name not in state:
            alias = next((k for k, v in expected.items() if k in state and v.data_ptr() == tensor.data_ptr()), None)
            if alias is not None:
                state[name] = state[alias]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong_shape:
        details = []
        for label, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong_shape)):
            if names:
                shown = ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
                details.append(f"{label}: {shown}")
        raise ValueError(f"checkpoint {path} does not match this {what}'s architecture; " + "; ".join(details))
    module.load_state_dict(state, strict=True)
