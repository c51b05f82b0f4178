"""One training loop for every task: AdamW, warmup + cosine, clipping, accumulation, autocast,
optional ``torch.compile``, an optional EMA of the weights, periodic evaluation, a JSONL log and atomic,
exactly-resumable checkpoints.

Data order is a pure function of (seed, samples consumed): the stream is the concatenation of
per-epoch permutations, so resuming only needs the count of samples already used.
"""
from __future__ import annotations

import copy
import json
import math
import random
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from zoo.checkpoint import atomic_write, load_module, load_tensors, read_json, save_module, save_tensors, write_json
from zoo.config import RunConfig
from zoo.data import create_dataset
from zoo.models.base import ZooModel, load_pretrained, load_weights
from zoo.registry import create_model
from zoo.tasks import Task, create_task

CHECKPOINTS = "checkpoints"
LATEST = "latest"
EMA_FILE = "ema.safetensors"


# --- environment -------------------------------------------------------------------------------


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} was requested but CUDA is not available on this machine")
    return device


AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain float32. ``auto`` is bf16 on CUDA, fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if name == "float32":
        return None
    if device.type != "cuda":
        raise ValueError(f"train.dtype={name!r} is not supported on {device.type}; use float32 (or auto) there")
    return AUTOCAST_DTYPES[name]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- data order ------------------------------------------------------------------------------------


class SampleStream:
    """Batches of indices from an endless, seeded sequence of epoch permutations, starting at ``consumed``.

    With several ranks each global batch is split into equal contiguous per-rank slices.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, consumed: int = 0, rank: int = 0, world: int = 1):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.consumed, self.rank, self.world = consumed, rank, world

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_items, generator=generator)

    def __iter__(self) -> Iterator[list[int]]:
        position = self.consumed
        global_batch = self.batch_size * self.world
        epoch = position // self.num_items
        stream = self._permutation(epoch)[position % self.num_items :]  # the rest of the current epoch
        while True:
            while len(stream) < global_batch:  # a batch may span epochs
                epoch += 1
                stream = torch.cat([stream, self._permutation(epoch)])
            batch, stream = stream[:global_batch], stream[global_batch:]
            yield batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].tolist()


def make_loader(dataset: Dataset, batch_size: int, seed: int, consumed: int, num_workers: int) -> DataLoader:
    rank, world = rank_and_world()
    stream = SampleStream(len(dataset), batch_size, seed, consumed, rank, world)
    # a private generator: the loader's worker seed must not draw from the global RNG (that would
    # shift dropout after a resume)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_sampler=stream, num_workers=num_workers, collate_fn=default_collate, generator=generator)


def eval_batches(dataset: Dataset, batch_size: int) -> Iterator[dict]:
    """The split in order, once (evaluation is deterministic and needs no sampler state)."""
    for start in range(0, len(dataset), batch_size):
        yield default_collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# --- optimisation ---------------------------------------------------------------------------------


def build_optimizer(model: nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; matrices and embeddings decay, vectors (norms, biases) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=device.type == "cuda")


def lr_factor(step: int, cfg) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class EMA:
    """An fp32 exponential moving average of a model's parameters, kept as a frozen copy of the model
    (``self.module``, ready to evaluate); buffers are copied as they are.

    After update ``n`` (1-based): ``ema = d * ema + (1 - d) * param`` with ``d = decay``, or with ``warmup``
    ``d = min(decay, (1 + n) / (10 + n))`` so that short runs are not dominated by the initial weights.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        self.decay, self.warmup = decay, warmup
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        for p in self.module.parameters():
            p.data = p.data.float()

    def decay_at(self, n: int) -> float:
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, n: int) -> None:
        """Move the average toward ``model``'s weights after optimizer step ``n`` (1-based)."""
        ema_params = list(self.module.parameters())
        params = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay_at(n))
        for ema_buffer, buffer in zip(self.module.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)

    def save(self, path: Path) -> Path:
        return save_module(path, self.module, metadata={"format": "pt", "ema_decay": str(self.decay)})

    def load(self, path: Path) -> None:
        load_module(path, self.module, what="EMA")


# --- checkpoints ----------------------------------------------------------------------------------


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    pointer = Path(out_dir) / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "trainer_state.json").is_file() else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder resolves to its latest checkpoint; a checkpoint folder is itself."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint folder (config.json) nor a run folder with checkpoints")
    return latest


def load_checkpoint_model(folder: Path, device: torch.device, ema: bool | None) -> ZooModel:
    """The model of a checkpoint folder with its raw weights (``ema=False``), its EMA weights (``True``;
    ValueError if the folder holds no ``ema.safetensors``) or the EMA when there is one (``None``)."""
    has_ema = (folder / EMA_FILE).is_file()
    if ema and not has_ema:
        raise ValueError(f"ema=true but {folder} holds no {EMA_FILE} (the run was trained without train.ema_decay)")
    model = load_pretrained(folder, device=device)
    if has_ema if ema is None else ema:
        load_module(folder / EMA_FILE, model, what=f"{model.model_name} model (EMA weights)")
    return model


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    np_state = np.random.get_state()
    plain = {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, plain


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    per_param: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            per_param.setdefault(int(idx), {})[key] = value
    for name, value in plain["scalars"].items():
        idx, key = name.split(".", 1)
        per_param.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": plain["param_groups"]})


def save_checkpoint(out_dir: Path, step: int, model: ZooModel, optimizer, scheduler, consumed: int, run: RunConfig,
                    metrics: dict[str, Any] | None = None, ema: EMA | None = None) -> Path:
    """Write a checkpoint folder (with ``ema.safetensors`` when ``ema`` is given) under a temporary name,
    rename it into place, then move ``latest``."""
    root = out_dir / CHECKPOINTS
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, extra={"run": run.model_dump(), "step": step, "metrics": metrics or {}})
    if ema is not None:
        ema.save(tmp / EMA_FILE)
    opt_tensors, opt_plain = optimizer_state(optimizer)
    rng_tensors, rng_plain = rng_state()
    save_tensors(tmp / "trainer_state.safetensors", {**opt_tensors, **rng_tensors})
    write_json(tmp / "trainer_state.json", {
        "step": step, "consumed": consumed, "optimizer": opt_plain, "scheduler": scheduler.state_dict(), "rng": rng_plain,
    })
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    atomic_write(root / LATEST, lambda p: Path(p).write_text(final.name + "\n"))
    for old in sorted(root.glob("step_*"))[: -run.train.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# --- the loop -------------------------------------------------------------------------------------


class MetricsLog:
    """Appends JSON lines to ``metrics.jsonl``; on resume, drops records past the resumed step."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = []
        if resume_step is not None and path.is_file():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def build_run(run: RunConfig, device: torch.device) -> tuple[ZooModel, Task, Dataset, Dataset]:
    """Model, task and the train/val datasets of a run config, checked against each other; with a ``teacher``
    the task distils it into the model (on resume the checkpoint's weights then replace any ``init`` copy)."""
    train_set = create_dataset(run.data.name, "train", **run.data.kwargs())
    val_set = create_dataset(run.data.name, "val", **run.data.kwargs())
    model = create_model(run.model.name, **run.model.kwargs()).to(device)
    task = create_task(run.task.name, **run.task.kwargs())
    task.check_data(model, train_set)
    if run.teacher is not None:
        teacher = load_checkpoint_model(resolve_checkpoint(run.teacher.checkpoint), device, run.teacher.ema)
        task.set_teacher(model, teacher, init=run.teacher.init, **run.teacher.weights())
    return model, task, train_set, val_set


def train(run: RunConfig) -> dict[str, Any]:
    """Train as ``run`` says; returns the last evaluation's metrics."""
    cfg = run.train
    out_dir = Path(run.out_dir)
    rank, _ = rank_and_world()
    is_main = rank == 0
    device = resolve_device(cfg.device)
    autocast_dtype = resolve_dtype(cfg.dtype, device)

    resume_from = latest_checkpoint(out_dir) if run.resume else None
    if run.resume and resume_from is None:
        raise ValueError(f"resume=true but {out_dir} holds no checkpoint to resume from")
    if not run.resume and latest_checkpoint(out_dir) is not None:
        raise ValueError(f"{out_dir} already holds checkpoints: pass resume=true to continue, or choose another out_dir")

    seed_everything(cfg.seed)
    model, task, train_set, val_set = build_run(run, device)
    optimizer = build_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    start_step, consumed = 0, 0
    if resume_from is not None:
        try:
            load_weights(model, resume_from)
        except ValueError as e:
            raise ValueError(f"{e}. resume=true rebuilds the model from the config and overrides given now: pass the "
                             f"ones the run started with (its {out_dir / 'run.json'})") from None
        state = read_json(resume_from / "trainer_state.json")
        tensors = load_tensors(resume_from / "trainer_state.safetensors")
        load_optimizer_state(optimizer, tensors, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(tensors, state["rng"])
        start_step, consumed = state["step"], state["consumed"]
    ema = EMA(model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay is not None else None
    if ema is not None and resume_from is not None:
        if not (resume_from / EMA_FILE).is_file():
            raise ValueError(f"train.ema_decay is set but {resume_from} holds no {EMA_FILE} (the run was trained "
                             "without EMA): resume without train.ema_decay, or start a new run")
        ema.load(resume_from / EMA_FILE)

    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "run.json", run.model_dump())
    log = MetricsLog(out_dir / "metrics.jsonl", start_step if resume_from else None, is_main)
    forward_model = torch.compile(model) if cfg.compile else model
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype is torch.float16)
    autocast = (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype else nullcontext
    loader = iter(make_loader(train_set, cfg.batch_size, cfg.seed, consumed, cfg.num_workers))
    eval_size = cfg.eval_batch_size or cfg.batch_size
    samples_per_step = cfg.batch_size * cfg.grad_accum * rank_and_world()[1]

    def evaluate(step: int) -> dict[str, Any]:
        """Validation metrics of the model, and of its EMA (prefixed ``ema_``) when there is one."""
        def metrics_of(module: nn.Module) -> dict[str, Any]:
            return task.evaluate(module, (to_device(b, device) for b in eval_batches(val_set, eval_size)), cfg.eval_batches)

        with autocast():
            metrics = metrics_of(forward_model)
            if ema is not None:
                metrics.update({f"ema_{k}": v for k, v in metrics_of(ema.module).items() if k != "count"})
        log.write({"step": step, "split": "val", **metrics})
        return {"step": step, **metrics}

    from tqdm.auto import tqdm

    progress = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, disable=not (cfg.progress and is_main))
    model.train()
    last_eval: dict[str, Any] = {}
    tick, last_logged = time.perf_counter(), start_step
    for step in progress:
        done = step + 1
        log_now = done % cfg.log_every == 0 or done == cfg.steps
        for _ in range(cfg.grad_accum):
            batch = to_device(next(loader), device)
            with autocast():
                loss, metrics = task.loss(forward_model, batch, with_metrics=log_now)
            scaler.scale(loss / cfg.grad_accum).backward()
        consumed += samples_per_step
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if ema is not None:
            ema.update(model, done)
        if log_now:
            elapsed, tick = time.perf_counter() - tick, time.perf_counter()
            steps_since, last_logged = done - last_logged, done
            record = {"step": done, "split": "train", "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                      "samples_per_s": samples_per_step * steps_since / max(elapsed, 1e-9)}
            record.update({k: float(v) for k, v in metrics.items() if k != "count"})
            log.write(record)
            progress.set_postfix(loss=f"{record['loss']:.4f}")
        if done % cfg.eval_every == 0 or done == cfg.steps:
            last_eval = evaluate(done)
        if is_main and ((cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps):
            save_checkpoint(out_dir, done, model, optimizer, scheduler, consumed, run, metrics={"val": last_eval}, ema=ema)
    progress.close()
    return last_eval
