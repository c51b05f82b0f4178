"""Train and write the small checkpoints shipped under ``checkpoints/`` (CPU, a few minutes each).

Each is trained from its config, evaluated on the full validation split, and saved with that
evaluation recorded, so ``tests/zoo/test_shipped_checkpoints.py`` can check it reproduces.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from zoo.config import load_config
from zoo.evaluate import evaluate_checkpoint
from zoo.models.base import load_pretrained
from zoo.train import latest_checkpoint, train

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {  # (model name, tag) -> config and overrides
    ("lm-tiny", "mqar"): ("configs/lm/tiny-attention-mqar.yaml", []),
    # the classifier behind zoo.diffusion_eval's conditional accuracy and shapes-FID
    # (200k generated training images, so 6000 steps see each about twice; the validation split is the usual 1000)
    ("vit-tiny", "shapes"): ("configs/vit/tiny-shapes.yaml", ["train.steps=6000", "train.eval_every=2000",
                                                             "train.warmup_steps=200", "data.num_examples={train: 200000}"]),
}


def make(name: str, tag: str, config: str, overrides: list[str], work: Path) -> dict:
    run_dir = work / f"{name}-{tag}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run = load_config(ROOT / config, [*overrides, f"out_dir={run_dir}", "train.progress=false"])
    train(run)
    source = latest_checkpoint(run_dir)
    metrics = evaluate_checkpoint(source, ["split=val"])
    metrics.pop("checkpoint")
    target = ROOT / "checkpoints" / name / tag
    shutil.rmtree(target, ignore_errors=True)
    model = load_pretrained(source)
    model.save_pretrained(target, extra={"run": run.model_dump(), "metrics": {"val": metrics}})
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", default="runs/shipped", help="where the training runs go")
    parser.add_argument("--only", help="remake one checkpoint, NAME.TAG (e.g. vit-tiny.shapes)")
    args = parser.parse_args()
    names = {f"{name}.{tag}" for name, tag in SHIPPED}
    if args.only is not None and args.only not in names:
        parser.error(f"--only: unknown checkpoint {args.only!r}; choose from {', '.join(sorted(names))}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for (name, tag), (config, overrides) in SHIPPED.items():
        if args.only in (None, f"{name}.{tag}"):
            print(name, tag, make(name, tag, config, overrides, Path(args.work)))


if __name__ == "__main__":
    main()
