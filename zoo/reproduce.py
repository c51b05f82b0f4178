"""Reproductions: named, scripted runs whose result is checked against a published or stated target.

A reproduction is a function ``(quick: bool, out_dir: Path) -> dict`` registered by name; the
result dict carries ``passed`` and is written to ``out_dir/result.json`` and ``result.md``.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

from layers.registry import Registry
from zoo.checkpoint import write_json
from zoo.config import load_config
from zoo.train import train

REPRODUCTIONS = Registry("reproduction")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def register_reproduction(name: str) -> Callable:
    def decorator(fn: Callable) -> Callable:
        return REPRODUCTIONS.register(name, fn)

    return decorator


def list_reproductions(pattern: str = "*") -> list[str]:
    return REPRODUCTIONS.names(pattern)


def reproduce(name: str, quick: bool = False, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Run reproduction ``name`` from scratch in ``out_dir`` (default ``runs/reproduce/<name>``)."""
    fn = REPRODUCTIONS.get(name)
    out_dir = Path(out_dir or Path("runs") / "reproduce" / name)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    result = {"reproduction": name, "quick": quick, **fn(quick=quick, out_dir=out_dir)}
    write_json(out_dir / "result.json", result)
    (out_dir / "result.md").write_text(result_markdown(result))
    return result


def result_markdown(result: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in result.items() if not isinstance(v, (dict, list)))
    return f"# {result['reproduction']}\n\n| key | value |\n| --- | --- |\n{rows}\n"


@register_reproduction("lm-mqar-smoke")
def lm_mqar_smoke(quick: bool, out_dir: Path) -> dict[str, Any]:
    """lm-tiny with attention on MQAR (seq 64, 4 kv pairs) must reach >= 0.99 accuracy at answer positions."""
    overrides = [f"out_dir={out_dir / 'run'}"]
    if not quick:
        overrides += ["train.steps=3000"]
    config = load_config(CONFIGS / "lm" / "tiny-attention-mqar.yaml", overrides)
    metrics = train(config)
    target = 0.99
    return {"model": config.model.name, "mixer": "attention", "steps": config.train.steps, "accuracy": metrics["accuracy"],
            "target": target, "passed": metrics["accuracy"] >= target, "run_dir": config.out_dir}
