"""Running a kernel checks script of this folder under Triton's interpreter, for the CPU tests of our Triton kernels,
and checks those scripts share.

``TRITON_INTERPRET=1`` must be set before triton is first imported, so each script runs in its own process."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed (it comes with torch's Linux wheels; none exist for "
                                         "this platform)")


def run_interpreted(script: str) -> str:
    """Run ``script`` (a file of this folder) with TRITON_INTERPRET=1; its stdout, after asserting it exited 0."""
    done = subprocess.run([sys.executable, str(HERE / script)], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def check_compiled_like_eager(grads, fn, *args, device: str) -> None:
    """Under torch.compile (aot_eager on CPU, inductor on CUDA) a custom op gives the eager kernels' results bit for
    bit: ``grads(fn, *args)`` (the output and the inputs' gradients) compiled and eager."""
    eager = grads(fn, *args)
    compiled = grads(torch.compile(fn, backend="aot_eager" if device == "cpu" else "inductor", fullgraph=True), *args)
    for e, c in zip(eager, compiled):
        assert torch.equal(e, c)
