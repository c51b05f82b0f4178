"""Reproductions: named, scripted runs whose result is checked against a published or stated target.

A reproduction is a function ``(quick: bool, out_dir: Path, options: SweepOptions) -> dict`` registered
by name; the result dict carries ``passed`` and is written to ``out_dir/result.json`` and ``result.md``.
Sweeps are YAML files under ``configs/reproduce/`` whose grids expand into a plain list of runs
(Zoology style); ``run_sweep`` executes them in this process or in parallel subprocesses, appending
each finished run to ``out_dir/results.jsonl``.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from itertools import product
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, NonNegativeInt, PositiveFloat, PositiveInt, ValidationError, model_validator

from layers.mixer import MIXERS
from layers.registry import Registry
from zoo.checkpoint import write_json
from zoo.config import load_config
from zoo.train import latest_checkpoint, train

REPRODUCTIONS = Registry("reproduction")
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SWEEPS = CONFIGS / "reproduce"
RESULTS = "results.jsonl"
STDERR_TAIL = 2000  # characters of a failed run's stderr kept in its record


def register_reproduction(name: str) -> Callable:
    def decorator(fn: Callable) -> Callable:
        return REPRODUCTIONS.register(name, fn)

    return decorator


def list_reproductions(pattern: str = "*") -> list[str]:
    return REPRODUCTIONS.names(pattern)


@dataclass
class SweepOptions:
    """How to run a sweep: parallelism, GPUs, resumption, and filters/overrides of the grid's axes."""

    jobs: int = 1  # runs at once; 1 (without devices) runs them one after another in this process
    devices: list[str] | None = None  # CUDA_VISIBLE_DEVICES values handed to subprocess slots round-robin
    steps: int | None = None  # replaces the grid's steps
    lrs: list[float] | None = None  # replaces the grid's learning rates
    mixers: list[str] | None = None  # picks mixers from the sweep's table
    resume: bool = False  # keep out_dir, skip runs recorded as finished in results.jsonl, continue interrupted ones
    grid: dict[str, Any] | None = None  # replaces any other axes of the grid ({"widths": [64, 128]})

    def __post_init__(self) -> None:
        if self.jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {self.jobs}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")

    @property
    def in_process(self) -> bool:
        return self.jobs == 1 and not self.devices


def reproduce(name: str, quick: bool = False, out_dir: str | Path | None = None, jobs: int = 1,
              devices: list[str] | None = None, steps: int | None = None, lrs: list[float] | None = None,
              mixers: list[str] | None = None, resume: bool = False, grid: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run reproduction ``name`` in ``out_dir`` (default ``runs/reproduce/<name>``): from scratch, or with
    ``resume`` keeping the runs already finished there."""
    fn = REPRODUCTIONS.get(name)
    options = SweepOptions(jobs=jobs, devices=devices, steps=steps, lrs=lrs, mixers=mixers, resume=resume, grid=grid)
    out_dir = Path(out_dir or Path("runs") / "reproduce" / name)
    result = {"reproduction": name, "quick": quick, **fn(quick=quick, out_dir=out_dir, options=options)}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "result.json", result)
    (out_dir / "result.md").write_text(result_markdown(result))
    return result


def result_markdown(result: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in result.items() if not isinstance(v, (dict, list)))
    return f"# {result['reproduction']}\n\n| key | value |\n| --- | --- |\n{rows}\n"


# --- sweep files ----------------------------------------------------------------------------------


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Sweep(Strict):
    """Common to sweep files: the base run config (relative to ``configs/``), overrides for every run,
    a ``mixers`` table and two grids, ``full`` and ``quick``, whose ``mixers`` (default: all) come from it."""

    base: str
    overrides: list[str] = []

    @model_validator(mode="after")
    def _consistent(self):
        if not (CONFIGS / self.base).is_file():
            raise ValueError(f"base: no such config file {CONFIGS / self.base}")
        for grid in ("full", "quick"):
            unknown = sorted(set(getattr(self, grid).mixers or ()) - set(self.mixers))
            if unknown:
                raise ValueError(f"{grid}.mixers: {', '.join(unknown)} not in the mixers table ({', '.join(self.mixers)})")
        return self

    def grid(self, quick: bool, options: SweepOptions):
        """The ``quick`` or ``full`` grid with the options' steps, lrs, mixers and other axes in place of its own."""
        unknown = [m for m in options.mixers or () if m not in self.mixers]
        if unknown:
            raise ValueError(f"unknown mixer(s) {', '.join(unknown)} for this sweep; valid: {', '.join(self.mixers)}")
        grid = self.quick if quick else self.full
        update = {"steps": options.steps, "lrs": options.lrs, "mixers": options.mixers or grid.mixers or list(self.mixers)}
        update = {k: v for k, v in update.items() if v is not None} | (options.grid or {})
        try:
            return type(grid).model_validate(grid.model_dump() | update)
        except ValidationError as e:
            raise ValueError(f"grid override: {describe_errors(e)}") from None

    @property
    def base_path(self) -> Path:
        return CONFIGS / self.base


class MqarGrid(Strict):
    mixers: list[str] | None = None
    lengths: list[tuple[PositiveInt, PositiveInt]]  # (seq_len, num_kv_pairs)
    widths: list[PositiveInt]
    lrs: list[PositiveFloat]
    steps: PositiveInt
    vocab_size: PositiveInt


class MqarSweep(Sweep):
    mixers: dict[str, dict[str, Any]]  # sweep name -> model.mixer spec
    paper: dict[str, str] = {}
    full: MqarGrid
    quick: MqarGrid

    @model_validator(mode="after")
    def _known_names(self):
        unregistered = sorted(k for k, spec in self.mixers.items() if spec.get("name") not in MIXERS)
        if unregistered:
            raise ValueError(f"mixers: {', '.join(unregistered)} need a 'name' among the registered mixers "
                             f"({', '.join(MIXERS.names())})")
        stray = sorted(set(self.paper) - set(self.mixers))
        if stray:
            raise ValueError(f"paper: {', '.join(stray)} not in the mixers table")
        return self


class LraColumn(Strict):
    lra_model: str
    lra_accuracy: float | None


class ListopsGrid(Strict):
    mixers: list[str] | None = None
    model: str
    min_length: PositiveInt
    max_length: PositiveInt
    train_examples: PositiveInt
    val_examples: PositiveInt  # evaluated at the end of training (the test split is evaluated after it)
    test_examples: PositiveInt
    steps: PositiveInt
    batch_size: PositiveInt
    lrs: list[PositiveFloat]
    num_workers: NonNegativeInt = 0  # data-loading processes per run: long expressions are generated on the fly
    save_every: PositiveInt | None = None  # checkpoint interval: a run stopped between two continues under --resume


class ListopsSweep(Sweep):
    mixers: dict[str, LraColumn]  # registered mixer -> the LRA column it is compared with
    full: ListopsGrid
    quick: ListopsGrid

    @model_validator(mode="after")
    def _registered(self):
        unregistered = sorted(set(self.mixers) - set(MIXERS.names()))
        if unregistered:
            raise ValueError(f"mixers: {', '.join(unregistered)} are not registered mixers ({', '.join(MIXERS.names())})")
        return self


def load_sweep(name: str, schema: type[Sweep]) -> Sweep:
    """``configs/reproduce/<name>.yaml`` validated by ``schema``; errors name the offending keys."""
    path = SWEEPS / f"{name}.yaml"
    try:
        return schema.model_validate(yaml.safe_load(path.read_text()))
    except ValidationError as e:
        raise ValueError(f"invalid sweep {path}: {describe_errors(e)}") from None


def describe_errors(e: ValidationError) -> str:
    """``key.path: problem; ...`` for each error, an unknown key said as such."""
    return "; ".join("{}: {}".format(".".join(str(p) for p in err["loc"]) or "sweep",
                                     "unknown key" if err["type"] == "extra_forbidden" else err["msg"]) for err in e.errors())


# --- running a sweep ------------------------------------------------------------------------------


class RunFailed(Exception):
    def __init__(self, returncode: int | None, error: str):
        super().__init__(error)
        self.returncode, self.error = returncode, error


@dataclass
class Run:
    """One run of a sweep: its description (its identity in results.jsonl), the base config and overrides
    that make it, and optionally ``zoo eval`` overrides for a test evaluation of its final checkpoint."""

    params: dict[str, Any]
    base: Path
    overrides: list[str]
    test: list[str] | None = None

    @property
    def name(self) -> str:
        digest = hashlib.sha1(json.dumps(self.params, sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.params.get('mixer', 'run')}-{digest}"


def run_in_process(run: Run, run_dir: Path, device: str | None) -> dict[str, Any]:
    """Train (and test) ``run`` here; ``device`` is unused (in-process runs see every GPU)."""
    try:
        metrics = {"metrics": train(load_config(run.base, [*run.overrides, f"out_dir={run_dir}"]))}
        if run.test is not None:
            from zoo.evaluate import evaluate_checkpoint

            metrics["test"] = evaluate_checkpoint(run_dir, run.test)
    except Exception as e:  # recorded with the run, the sweep goes on
        raise RunFailed(None, f"{type(e).__name__}: {e}") from e
    return metrics


def zoo_command(run_dir: Path, device: str | None, subcommand: str, *args: str) -> Path:
    """Run ``python -m zoo.cli SUBCOMMAND ARGS`` with stdout and stderr in ``run_dir``; returns the stdout file."""
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": device} if device is not None else {})}
    stdout, stderr = run_dir / f"{subcommand}.out", run_dir / f"{subcommand}.err"
    with open(stdout, "w") as out, open(stderr, "w") as err:
        code = subprocess.run([sys.executable, "-m", "zoo.cli", subcommand, *args], stdout=out, stderr=err, env=env,
                              cwd=ROOT).returncode
    if code != 0:
        raise RunFailed(code, stderr.read_text()[-STDERR_TAIL:])
    return stdout


def final_metrics(run_dir: Path) -> dict[str, Any]:
    """The last validation record of the run's metrics.jsonl (what ``train`` returns)."""
    log = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines() if line] if log.is_file() else []
    val = [{k: v for k, v in r.items() if k != "split"} for r in records if r.get("split") == "val"]
    if not val:
        raise RunFailed(0, f"{log} holds no validation record")
    return val[-1]


def run_in_subprocess(run: Run, run_dir: Path, device: str | None) -> dict[str, Any]:
    """Train ``run`` with ``zoo train`` (and test it with ``zoo eval``) in subprocesses that see ``device``."""
    run_dir.mkdir(parents=True, exist_ok=True)  # an interrupted run's folder, when it resumes
    zoo_command(run_dir, device, "train", str(run.base), *run.overrides, f"out_dir={run_dir.resolve()}", "train.progress=false")
    metrics = {"metrics": final_metrics(run_dir)}
    if run.test is not None:
        metrics["test"] = json.loads(zoo_command(run_dir, device, "eval", str(run_dir.resolve()), *run.test).read_text())
    return metrics


def execute(run: Run, out_dir: Path, device: str | None, runner: Callable, resume: bool = False) -> dict[str, Any]:
    """``run``'s record: its params, folder and status, with its metrics or its failure. With ``resume``, a run
    interrupted after writing a checkpoint continues from it (``resume=true``); otherwise an earlier attempt's
    folder is cleared."""
    run_dir = out_dir / run.name
    if resume and latest_checkpoint(run_dir) is not None:
        run = replace(run, overrides=[*run.overrides, "resume=true"])
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    record = {**run.params, "run": run.name, "run_dir": str(run_dir)}
    try:
        return {**record, "status": "ok", **runner(run, run_dir, device)}
    except RunFailed as e:
        return {**record, "status": "failed", "returncode": e.returncode, "error": e.error}


def finished_runs(path: Path) -> dict[str, dict[str, Any]]:
    """Records of the runs results.jsonl holds as finished, by run name (failed runs are tried again)."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []
    return {r["run"]: r for r in records if r["status"] == "ok"}


def run_sweep(runs: list[Run], out_dir: Path, options: SweepOptions) -> list[dict[str, Any]]:
    """Execute ``runs`` and return their records in order. Each record is appended to results.jsonl as its
    run ends. With ``options.resume`` the runs already finished there are not run again, interrupted runs
    continue from their last checkpoint (``train.save_every`` sets how often one is written), and the records of
    runs finished there by earlier invocations follow (a sweep split over several calls, e.g. by ``--mixers``,
    reports all of it)."""
    if not options.resume:
        shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / RESULTS
    records = finished_runs(results) if options.resume else {}
    todo = [run for run in runs if run.name not in records]

    def keep(record: dict[str, Any]) -> None:
        records[record["run"]] = record
        with open(results, "a") as f:
            f.write(json.dumps(record) + "\n")

    if options.in_process:
        for run in todo:
            keep(execute(run, out_dir, None, run_in_process, options.resume))
    else:
        slots: queue.Queue = queue.Queue()  # one per job; devices dealt round-robin
        for k in range(options.jobs):
            slots.put(options.devices[k % len(options.devices)] if options.devices else None)

        def on_a_slot(run: Run) -> dict[str, Any]:
            device = slots.get()
            try:
                return execute(run, out_dir, device, run_in_subprocess, options.resume)
            finally:
                slots.put(device)

        pool = ThreadPoolExecutor(options.jobs)
        try:
            for future in as_completed([pool.submit(on_a_slot, run) for run in todo]):
                keep(future.result())
        except KeyboardInterrupt:  # stop here: report the runs that finished (--resume runs the rest later)
            finished = sum(run.name in records for run in runs)
            warnings.warn(f"interrupted: {finished} of {len(runs)} runs finished; the report covers those")
        finally:  # start no further runs
            pool.shutdown(cancel_futures=True)
    names = [run.name for run in runs]
    return [records[name] for name in names if name in records] + [r for name, r in records.items() if name not in names]


def failures_markdown(records: list[dict[str, Any]]) -> str:
    failed = [r for r in records if r["status"] != "ok"]
    rows = [f"| {r['run']} | {r['returncode']} | {(r['error'].strip().splitlines() or [''])[-1]} |" for r in failed]
    return "\n## Failed runs\n\n| run | returncode | error |\n|---|---|---|\n" + "\n".join(rows) + "\n" if failed else ""


# --- lm-tiny on MQAR --------------------------------------------------------------------------------


@register_reproduction("lm-mqar-smoke")
def lm_mqar_smoke(quick: bool, out_dir: Path, options: SweepOptions) -> dict[str, Any]:
    """lm-tiny with attention on MQAR (seq 64, 4 kv pairs) must reach >= 0.99 accuracy at answer positions."""
    if options.lrs or options.mixers:
        raise ValueError("lm-mqar-smoke is a single run: --lrs and --mixers do not apply")
    base = CONFIGS / "lm" / "tiny-attention-mqar.yaml"
    config = load_config(base)
    steps = options.steps or (config.train.steps if quick else 3000)
    [record] = run_sweep([Run({"mixer": "attention", "steps": steps}, base, [f"train.steps={steps}"])], out_dir, options)
    accuracy = record.get("metrics", {}).get("accuracy")
    target = 0.99
    return {"model": config.model.name, "mixer": "attention", "steps": steps, "accuracy": accuracy, "target": target,
            "passed": accuracy is not None and accuracy >= target, "run_dir": record["run_dir"], "status": record["status"]}


# --- Zoology's MQAR grid (Arora et al. 2023, Figure 2): configs/reproduce/mqar.yaml ----------------------


def mqar_overrides(run: dict[str, Any], sweep: MqarSweep) -> list[str]:
    """Overrides of the base config for one MQAR run description (the sweep's own overrides last)."""
    mixer = json.dumps(sweep.mixers[run["mixer"]]).replace(" ", "")
    return [
        f"model.dim={run['dim']}", f"model.mixer={mixer}", f"model.vocab_size={run['vocab_size']}",
        f"model.max_seq_len={run['seq_len']}", f"data.vocab_size={run['vocab_size']}", f"data.seq_len={run['seq_len']}",
        f"data.num_kv_pairs={run['num_kv_pairs']}", f"train.lr={run['lr']}", f"train.steps={run['steps']}", *sweep.overrides,
    ]


def mqar_runs(quick: bool, options: SweepOptions | None = None) -> list[Run]:
    """The sweep as a plain list of runs (Zoology style), one per mixer x length x width x lr."""
    sweep = load_sweep("mqar", MqarSweep)
    grid = sweep.grid(quick, options or SweepOptions())
    params = [dict(mixer=m, seq_len=t, num_kv_pairs=kv, dim=d, lr=lr, vocab_size=grid.vocab_size, steps=grid.steps)
              for m, (t, kv), d, lr in product(grid.mixers, grid.lengths, grid.widths, grid.lrs)]
    return [Run(p, sweep.base_path, mqar_overrides(p, sweep)) for p in params]


@register_reproduction("mqar")
def mqar(quick: bool, out_dir: Path, options: SweepOptions) -> dict[str, Any]:
    """Accuracy vs d_model per mixer and sequence length (best over the learning-rate sweep)."""
    paper = load_sweep("mqar", MqarSweep).paper
    records = run_sweep(mqar_runs(quick, options), out_dir, options)
    best: dict[tuple, dict[str, Any]] = {}
    for r in (dict(r, accuracy=r["metrics"]["accuracy"]) for r in records if r["status"] == "ok"):
        key = (r["mixer"], r["seq_len"], r["dim"])
        if key not in best or r["accuracy"] > best[key]["accuracy"]:
            best[key] = r
    table = sorted(best.values(), key=lambda r: (r["seq_len"], r["mixer"], r["dim"]))
    (out_dir / "mqar.md").write_text(mqar_markdown(table, paper) + failures_markdown(records))
    plot_mqar(table, out_dir / "mqar.png")
    accuracy = {r["mixer"]: r["accuracy"] for r in table if r["seq_len"] == 64 and r["dim"] == 64}
    passed = accuracy.get("attention", 0.0) >= 0.99 and accuracy.get("linear", 1.0) < accuracy.get("attention", 0.0) - 0.05
    return {"runs": [r for r in records if r["status"] == "ok"], "best": table,
            "failed": [r for r in records if r["status"] != "ok"],
            "attention_d64": accuracy.get("attention"), "linear_d64": accuracy.get("linear"), "passed": passed,
            "results": str(out_dir / RESULTS), "table": str(out_dir / "mqar.md"), "plot": str(out_dir / "mqar.png")}


def mqar_markdown(table: list[dict[str, Any]], paper: dict[str, str]) -> str:
    rows = [f"| {r['mixer']} | {r['seq_len']} | {r['num_kv_pairs']} | {r['dim']} | {r['lr']:g} | {r['accuracy']:.4f} | "
            f"{paper.get(r['mixer'], '')} |" for r in table]
    header = "| mixer | seq_len | kv pairs | d_model | best lr | accuracy | Zoology (paper) |\n|---|---|---|---|---|---|---|"
    return "# MQAR: accuracy at answer positions (best over learning rates)\n\n" + header + "\n" + "\n".join(rows) + "\n"


def plot_mqar(table: list[dict[str, Any]], path: Path) -> None:
    """Accuracy vs d_model, one panel per sequence length (an empty figure when no run finished)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["seq_len"] for r in table}) or [None]
    fig, axes = plt.subplots(1, len(lengths), figsize=(4 * len(lengths), 3.2), squeeze=False)
    for ax, seq_len in zip(axes[0], lengths):
        for mixer in sorted({r["mixer"] for r in table}):
            points = sorted((r["dim"], r["accuracy"]) for r in table if r["mixer"] == mixer and r["seq_len"] == seq_len)
            ax.plot(*zip(*points), marker="o", label=mixer)
        ax.set(title=f"seq_len {seq_len}", xlabel="d_model", ylabel="accuracy", xscale="log", ylim=(0, 1.02))
    if table:
        axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- LRA ListOps (Tay et al. 2021, Table 1): configs/reproduce/listops.yaml --------------------------


def listops_overrides(run: dict[str, Any], sweep: ListopsSweep) -> list[str]:
    """Overrides of the base config for one ListOps run description (the sweep's own overrides last)."""
    return [
        f"model.name={run['model']}", f"model.mixer={run['mixer']}", f"model.max_seq_len={run['max_length'] + 1}",
        f"data.min_length={run['min_length']}", f"data.max_length={run['max_length']}",
        f"data.num_examples={{train: {run['train_examples']}, val: {run['val_examples']}}}",
        f"train.num_workers={run['num_workers']}", f"train.save_every={run['save_every'] or 'null'}",
        f"train.steps={run['steps']}", f"train.batch_size={run['batch_size']}", f"train.lr={run['lr']}",
        f"train.warmup_steps={run['steps'] // 10}", f"train.eval_every={run['steps']}", *sweep.overrides,
    ]


def listops_runs(quick: bool, options: SweepOptions | None = None) -> list[Run]:
    """One run per mixer (and lr), each tested on ``test_examples`` of the test split."""
    sweep = load_sweep("listops", ListopsSweep)
    grid = sweep.grid(quick, options or SweepOptions())
    axes = grid.model_dump(exclude={"mixers", "lrs", "test_examples"})
    params = [dict(mixer=m, **axes, lr=lr) for m, lr in product(grid.mixers, grid.lrs)]
    test = ["split=test", f"data.num_examples={grid.test_examples}"]
    return [Run(p, sweep.base_path, listops_overrides(p, sweep), test) for p in params]


@register_reproduction("listops")
def listops(quick: bool, out_dir: Path, options: SweepOptions) -> dict[str, Any]:
    """Test accuracy per mixer on ListOps beside LRA's published column (the quick run is far smaller than LRA's)."""
    columns = load_sweep("listops", ListopsSweep).mixers
    records = run_sweep(listops_runs(quick, options), out_dir, options)
    results = [dict(r, test_accuracy=r["test"]["accuracy"], lra_model=columns[r["mixer"]].lra_model,
                    lra_accuracy=columns[r["mixer"]].lra_accuracy) for r in records if r["status"] == "ok"]
    rows = [f"| {r['mixer']} | {r['lr']:g} | {100 * r['test_accuracy']:.2f} | {r['lra_model']} | {r['lra_accuracy'] or 'n/a'} |"
            for r in results]
    table = "| mixer | lr | ours (test %) | LRA model | LRA (test %) |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    (out_dir / "listops.md").write_text("# ListOps\n\n" + table + failures_markdown(records))
    return {"runs": results, "failed": [r for r in records if r["status"] != "ok"], "results": str(out_dir / RESULTS),
            "table": str(out_dir / "listops.md")}


# --- MoE vs dense at equal active parameters (Switch Transformer): configs/reproduce/moe-vs-dense.yaml ----------


class MoeGrid(Strict):
    size: str  # the LM size: lm-<size>
    seq_len: PositiveInt
    steps: PositiveInt
    batch_size: PositiveInt
    lrs: list[PositiveFloat]
    max_bytes: PositiveInt | None  # pytext bytes read per split; None: the whole corpus, so no run repeats an epoch
    mixers: list[str] | None = None  # unused: every model of the table runs


class MoeVsDenseSweep(Sweep):
    primary: str  # the MoE whose loss must beat the dense LM's
    models: dict[str, dict[str, Any]]  # sweep name -> model config overrides
    mixers: dict[str, Any] = {}
    full: MoeGrid
    quick: MoeGrid

    @model_validator(mode="after")
    def _primary_and_dense(self):
        missing = sorted({"dense", self.primary} - set(self.models))
        if missing:
            raise ValueError(f"models: needs {', '.join(missing)} (primary: {self.primary}); has {', '.join(self.models)}")
        return self


def moe_vs_dense_runs(quick: bool, options: SweepOptions | None = None) -> list[Run]:
    """One run per model of the table (and lr), all of one LM size, equal steps."""
    options = options or SweepOptions()
    if options.mixers:
        raise ValueError("moe-vs-dense compares models, not mixers: --mixers does not apply")
    sweep = load_sweep("moe-vs-dense", MoeVsDenseSweep)
    grid = sweep.grid(quick, options)
    runs = []
    for (label, model), lr in product(sweep.models.items(), grid.lrs):
        params = dict(model=label, size=grid.size, seq_len=grid.seq_len, steps=grid.steps, batch_size=grid.batch_size, lr=lr,
                      max_bytes=grid.max_bytes)
        overrides = [f"model.name=lm-{grid.size}", f"model.max_seq_len={grid.seq_len}", f"data.seq_len={grid.seq_len}",
                     f"data.max_bytes={'null' if grid.max_bytes is None else grid.max_bytes}",
                     *(f"model.{k}={json.dumps(v).replace(' ', '')}" for k, v in model.items()),
                     f"train.steps={grid.steps}", f"train.batch_size={grid.batch_size}", f"train.lr={lr}",
                     f"train.warmup_steps={grid.steps // 10}", f"train.eval_every={grid.steps}", *sweep.overrides]
        runs.append(Run(params, sweep.base_path, overrides))
    return runs


@register_reproduction("moe-vs-dense")
def moe_vs_dense(quick: bool, out_dir: Path, options: SweepOptions) -> dict[str, Any]:
    """Validation loss of each MoE LM against the dense LM with the same active parameters; passes when the
    sweep's ``primary`` MoE ends below the dense LM (the others are reported beside it)."""
    from zoo.registry import create_model

    sweep = load_sweep("moe-vs-dense", MoeVsDenseSweep)
    records = run_sweep(moe_vs_dense_runs(quick, options), out_dir, options)
    results = []
    for r in (r for r in records if r["status"] == "ok"):
        with torch.device("meta"):
            model = create_model(f"lm-{r['size']}", **sweep.models[r["model"]])
        train_log = [json.loads(line) for line in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        speed = [x["samples_per_s"] for x in train_log if x.get("split") == "train" and "samples_per_s" in x]
        results.append({**r, "val_loss": r["metrics"]["loss"], "params": model.num_params(),
                        "active_params": model.num_active_params(), "samples_per_s": speed[-1] if speed else None})
    dense = {r["lr"]: r["val_loss"] for r in results if r["model"] == "dense"}
    primary = [r for r in results if r["model"] == sweep.primary]
    passed = bool(primary) and all(r["lr"] in dense and r["val_loss"] < dense[r["lr"]] for r in primary)
    rows = [f"| {r['model']} | {r['lr']:g} | {r['params']:,} | {r['active_params']:,} | {r['val_loss']:.4f} | "
            f"{r['samples_per_s'] or float('nan'):.1f} |" for r in results]
    table = ("| model | lr | params | active params | val loss | samples/s |\n|---|---|---|---|---|---|\n"
             + "\n".join(rows) + "\n")
    (out_dir / "moe-vs-dense.md").write_text("# MoE vs dense at equal active parameters\n\n" + table + failures_markdown(records))
    return {"runs": results, "failed": [r for r in records if r["status"] != "ok"], "passed": passed,
            "results": str(out_dir / RESULTS), "table": str(out_dir / "moe-vs-dense.md")}


# --- Token reduction off the shelf (ToMe, EViT, DynamicViT): configs/reproduce/tome.yaml ---------------------


class TomeGrid(Strict):
    steps: PositiveInt
    batch_size: PositiveInt
    lr: PositiveFloat
    eval_examples: PositiveInt
    throughput_batch: PositiveInt
    repeats: PositiveInt
    mixers: list[str] | None = None  # unused: one model is trained


class PaperFigure(Strict):
    method: str
    baseline_top1: float | None
    top1: float | None
    baseline_img_s: float | None
    img_s: float | None


class TomeSweep(Sweep):
    methods: dict[str, dict[str, Any] | None]  # label -> token_reduction spec applied at eval (None: baseline)
    primary: str
    max_drop: float
    start_from: str | None = None  # a shipped checkpoint tag of the base model to fine-tune (None: from scratch)
    paper: list[PaperFigure] = []
    mixers: dict[str, Any] = {}
    full: TomeGrid
    quick: TomeGrid

    @model_validator(mode="after")
    def _primary_and_baseline(self):
        missing = sorted({"baseline", self.primary} - set(self.methods))
        if missing:
            raise ValueError(f"methods: needs {', '.join(missing)} (primary: {self.primary}); has {', '.join(self.methods)}")
        return self


def with_reduction(trained: torch.nn.Module, spec: dict[str, Any] | None) -> torch.nn.Module:
    """``trained``'s weights in a model with token reduction ``spec``; only the method's own parameters
    (DynamicViT's score predictor) stay as initialised."""
    config = trained.config_class.model_validate({**trained.config.model_dump(), "token_reduction": spec})
    model = type(trained)(config, name=trained.model_name)
    missing, unexpected = model.load_state_dict(trained.state_dict(), strict=False)
    stray = [k for k in [*missing, *unexpected] if not k.startswith("token_reduction.")]
    if stray:
        raise ValueError(f"token_reduction {spec} changes weights beyond its own: {', '.join(stray)}")
    return model.eval()


def tome_accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int) -> tuple[float, bool]:
    """(top-1 %, whether ToMe clipped r) of ``model`` on ``images``."""
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        predictions = torch.cat([model(x).argmax(dim=-1) for x in images.split(batch)])
    clipped = any("ToMe: r=" in str(w.message) for w in caught)
    return 100.0 * (predictions == labels).float().mean().item(), clipped


def side_by_side_throughput(models: dict[str, torch.nn.Module], images: torch.Tensor, repeats: int) -> dict[str, float]:
    """Images/s of each model (inference, no autograd) on one batch, timed in turns so drift hits all alike."""
    times: dict[str, list[float]] = {label: [] for label in models}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ToMe's clipping is reported by tome_accuracy
        for model in models.values():  # warm up
            model(images)
        for _ in range(repeats):
            for label, model in models.items():
                start = time.perf_counter()
                model(images)
                times[label].append(time.perf_counter() - start)
    return {label: len(images) / statistics.median(t) for label, t in times.items()}


@register_reproduction("tome")
def tome(quick: bool, out_dir: Path, options: SweepOptions) -> dict[str, Any]:
    """Train one ViT without reduction (from scratch, or fine-tuning the sweep's ``start_from`` checkpoint), then
    top-1 and images/s with each method of the sweep applied at eval; passes when the ``primary`` method is faster
    than the baseline and loses at most ``max_drop`` points."""
    from zoo.data import create_dataset
    from zoo.models.base import load_pretrained

    if options.mixers:
        raise ValueError("tome compares token reductions, not mixers: --mixers does not apply")
    sweep = load_sweep("tome", TomeSweep)
    grid = sweep.grid(quick, options)
    params = dict(steps=grid.steps, batch_size=grid.batch_size, lr=grid.lr)
    overrides = [f"train.steps={grid.steps}", f"train.batch_size={grid.batch_size}", f"train.lr={grid.lr}",
                 f"train.warmup_steps={max(1, grid.steps // 10)}", f"train.eval_every={grid.steps}",
                 *([f"model.pretrained={sweep.start_from}"] if sweep.start_from else []), *sweep.overrides]
    [record] = run_sweep([Run({"mixer": "attention", **params}, sweep.base_path, overrides)], out_dir, options)
    if record["status"] != "ok":
        raise RuntimeError(f"training failed: {record['error']}")
    trained = load_pretrained(latest_checkpoint(record["run_dir"]))
    data = load_config(sweep.base_path).data
    val = create_dataset(data.name, "val", **{**data.kwargs(), "num_examples": grid.eval_examples})
    images = torch.stack([val[i]["image"] for i in range(len(val))])
    labels = torch.stack([val[i]["label"] for i in range(len(val))])

    models = {label: with_reduction(trained, spec) for label, spec in sweep.methods.items()}
    speed = side_by_side_throughput(models, images[:grid.throughput_batch], grid.repeats)
    rows = []
    for label, model in models.items():
        top1, clipped = tome_accuracy(model, images, labels, grid.throughput_batch)
        rows.append({"method": label, "token_reduction": sweep.methods[label], "top1": top1, "clipped": clipped,
                     "images_per_s": speed[label], "speedup": speed[label] / speed["baseline"]})
    base = next(r for r in rows if r["method"] == "baseline")
    primary = next(r for r in rows if r["method"] == sweep.primary)
    passed = primary["speedup"] > 1.0 and base["top1"] - primary["top1"] <= sweep.max_drop
    start = f"from {trained.model_name}.{sweep.start_from}" if sweep.start_from else "from scratch"
    (out_dir / "tome.md").write_text(tome_markdown(rows, base, sweep.paper, trained.model_name, grid, start))
    plot_tome(rows, out_dir / "tome.png")
    return {"model": trained.model_name, **params, "rows": rows, "paper": [p.model_dump() for p in sweep.paper],
            "baseline_top1": base["top1"], "primary": sweep.primary, "primary_top1": primary["top1"],
            "primary_speedup": primary["speedup"], "passed": passed, "table": str(out_dir / "tome.md"),
            "plot": str(out_dir / "tome.png"), "run_dir": record["run_dir"]}


def tome_markdown(rows: list[dict[str, Any]], base: dict[str, Any], paper: list[PaperFigure], model: str, grid: TomeGrid,
                  start: str) -> str:
    ours = [f"| {r['method']} | {'yes' if r['clipped'] else ''} | {r['top1']:.2f} | {r['top1'] - base['top1']:+.2f} | "
            f"{r['images_per_s']:.0f} | {r['speedup']:.2f}x |" for r in rows]
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)
    published = [f"| {p.method} | {fmt(p.baseline_top1, '.2f')} -> {fmt(p.top1, '.2f')} | "
                 f"{fmt(p.baseline_img_s, '.0f')} -> {fmt(p.img_s, '.0f')} |" for p in paper]
    return (f"# Token reduction off the shelf: {model} on shapes ({grid.steps} steps {start}), reduction applied at eval\n\n"
            f"Throughput: batch {grid.throughput_batch}, inference, median of {grid.repeats} turns, all methods "
            f"timed side by side in one process. Clipped: ToMe's r exceeded half the tokens at some layer.\n\n"
            "| method | r clipped | top-1 % | vs baseline | images/s | speedup |\n|---|---|---|---|---|---|\n"
            + "\n".join(ours) + "\n\n## Published (ImageNet-1k)\n\n| method | top-1 % (baseline -> reduced) | images/s |\n"
            "|---|---|---|\n" + "\n".join(published) + "\n")


def plot_tome(rows: list[dict[str, Any]], path: Path) -> None:
    """Top-1 vs images/s, one line per method family (the baseline a star)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    families: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["token_reduction"] is not None:
            families.setdefault(r["token_reduction"]["name"], []).append(r)
    for family, members in families.items():
        ax.plot([r["images_per_s"] for r in members], [r["top1"] for r in members], marker="o", label=family)
        for r in members:
            ax.annotate(r["method"].split("-", 1)[-1], (r["images_per_s"], r["top1"]), fontsize=6)
    base = next(r for r in rows if r["method"] == "baseline")
    ax.plot([base["images_per_s"]], [base["top1"]], marker="*", markersize=12, linestyle="", color="k", label="baseline")
    ax.set(xlabel="images/s", ylabel="top-1 %", title="token reduction off the shelf")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --- Diffusion backbone sizes (BK-SDM, Kim et al. 2023; DiT, Peebles & Xie 2023): configs/reproduce/bk-sdm-sizes.yaml ---


# the ops of convolutions and linear layers (what thop counts); the rest of the counter's ops are attention products
WEIGHT_LAYER_OPS = frozenset({"aten.convolution", "aten.addmm", "aten.mm"})


class PublishedSize(Strict):
    model: str
    paper: str
    params_m: PositiveFloat
    params_rounded: str | None = None
    macs_g: PositiveFloat
    counted: Literal["all", "weight-layers"]


class SizesSpec(Strict):
    """A reproduction that trains nothing: the models, their published sizes and the tolerances."""

    param_tolerance: PositiveFloat
    macs_tolerance: PositiveFloat
    text_tokens: PositiveInt
    models: list[PublishedSize]
    quick: list[str]

    @model_validator(mode="after")
    def _quick_subset(self):
        unknown = sorted(set(self.quick) - {m.model for m in self.models})
        if unknown:
            raise ValueError(f"quick: {', '.join(unknown)} not among the models")
        return self


def forward_macs(model: torch.nn.Module, text_tokens: int) -> dict[str, float]:
    """MACs (FLOPs / 2) of one batch-1 forward of a diffusion backbone built on the meta device, by op name.

    Runs ``predict`` (the input checks read label values, which meta tensors have none of)."""
    from torch.utils.flop_counter import FlopCounterMode

    from zoo.bench import CPU_SDPA_FLOPS

    with torch.device("meta"):
        sample = torch.zeros(1, *model.sample_shape)
        text = getattr(model.config, "cross_attention_dim", None)
        cond = torch.zeros(1, text_tokens, text) if text else torch.zeros(1, dtype=torch.long)
        timesteps = torch.zeros(1)
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter, torch.no_grad():
        model.predict(sample, timesteps, cond)
    return {str(op): flops / 2 for op, flops in counter.get_flop_counts()["Global"].items()}


def size_row(entry: PublishedSize, spec: SizesSpec) -> dict[str, Any]:
    """Our parameter count and MACs of ``entry.model`` beside the published ones."""
    from zoo.registry import create_model

    with torch.device("meta"):
        model = create_model(entry.model).eval()
    macs = forward_macs(model, spec.text_tokens)
    total = sum(macs.values())
    weight_layers = sum(v for op, v in macs.items() if op in WEIGHT_LAYER_OPS)
    compared = {"all": total, "weight-layers": weight_layers}[entry.counted]
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    params_err = params_m / entry.params_m - 1
    macs_err = compared / 1e9 / entry.macs_g - 1
    return {**entry.model_dump(), "our_params_m": params_m, "params_rel_err": params_err,
            "our_macs_g_all": total / 1e9, "our_macs_g_weight_layers": weight_layers / 1e9,
            "our_macs_g": compared / 1e9, "macs_rel_err": macs_err,
            "passed": abs(params_err) <= spec.param_tolerance and abs(macs_err) <= spec.macs_tolerance}


@register_reproduction("bk-sdm-sizes")
def bk_sdm_sizes(quick: bool, out_dir: Path, options: SweepOptions) -> dict[str, Any]:
    """Parameters and MACs of the SD-1.5 / BK-SDM U-Nets and DiT-S..XL/2 against their papers (meta device,
    no weights allocated); passes when every count is within the sweep file's tolerances."""
    path = SWEEPS / "bk-sdm-sizes.yaml"
    try:
        spec = SizesSpec.model_validate(yaml.safe_load(path.read_text()))
    except ValidationError as e:
        raise ValueError(f"invalid {path}: {describe_errors(e)}") from None
    if options.steps or options.lrs or options.mixers or options.grid:
        raise ValueError("bk-sdm-sizes trains nothing: --steps, --lrs, --mixers and --grid do not apply")
    entries = [m for m in spec.models if not quick or m.model in spec.quick]
    rows = [size_row(entry, spec) for entry in entries]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sizes.md").write_text(sizes_markdown(rows, spec))
    return {"rows": rows, "models": len(rows), "failed": [r["model"] for r in rows if not r["passed"]],
            "passed": all(r["passed"] for r in rows), "table": str(out_dir / "sizes.md")}


def sizes_markdown(rows: list[dict[str, Any]], spec: SizesSpec) -> str:
    lines = [f"| {r['model']} | {r['paper']} | {r['our_params_m']:.1f} | {r['params_m']:g}"
             + (f" ({r['params_rounded']})" if r["params_rounded"] else "") + f" | {r['params_rel_err']:+.2%} | "
             f"{r['our_macs_g_all']:.2f} | {r['our_macs_g_weight_layers']:.2f} | {r['macs_g']:g} ({r['counted']}) | "
             f"{r['macs_rel_err']:+.2%} | {'yes' if r['passed'] else 'NO'} |" for r in rows]
    return ("# Diffusion backbone sizes vs published (batch 1, one forward; MACs = FLOPs / 2)\n\n"
            f"Tolerances: params {spec.param_tolerance:.0%}, MACs {spec.macs_tolerance:.0%}. U-Nets: 64x64x4 latent, "
            f"text states 1x{spec.text_tokens}x768; DiT: 32x32x4 latent (256x256 images). MACs counted on the meta "
            "device by torch's FlopCounterMode. 'weight layers' = convolutions + linear layers only, as thop counts "
            "(BK-SDM's numbers); 'all' adds the attention products Q K^T and A V (DiT's Gflops, multiply-adds).\n\n"
            "| model | paper | params M | published M | diff | GMACs all | GMACs weight layers | published GMACs "
            "(counted) | diff | passed |\n|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n")


# --- Diffusion family on the embedded shapes (DDIM, DPM-Solver, DeepCache, ToMe-SD): configs/reproduce/diffusion-shapes.yaml ---


class DiffusionGrid(Strict):
    steps: PositiveInt
    batch_size: PositiveInt
    lr: PositiveFloat
    samples: PositiveInt  # images sampled per configuration (labels cycle through the 6 shapes)
    sample_steps: list[PositiveInt]
    mixers: list[str] | None = None  # unused: every model of the table runs


class DiffusionSweep(Sweep):
    models: dict[str, dict[str, Any]]  # sweep name -> the run's model section
    schedulers: list[Literal["ddim", "dpm", "ddpm"]]
    guidance: PositiveFloat
    deepcache: dict[str, Any]  # zoo.acceleration.deepcache kwargs
    tome_sd: dict[str, Any]  # zoo.acceleration.tome_sd kwargs
    mixers: dict[str, Any] = {}
    full: DiffusionGrid
    quick: DiffusionGrid


def diffusion_runs(quick: bool, options: SweepOptions | None = None) -> list[Run]:
    """One run per model of the table, equal steps, batch size and lr."""
    options = options or SweepOptions()
    if options.mixers or options.lrs:
        raise ValueError("diffusion-shapes compares models: --mixers and --lrs do not apply")
    sweep = load_sweep("diffusion-shapes", DiffusionSweep)
    grid = sweep.grid(quick, options)
    runs = []
    for label, model in sweep.models.items():
        params = dict(mixer=label, model=label, steps=grid.steps, batch_size=grid.batch_size, lr=grid.lr)
        overrides = [*(f"model.{k}={json.dumps(v)}" for k, v in model.items()), f"train.steps={grid.steps}",
                     f"train.batch_size={grid.batch_size}", f"train.lr={grid.lr}",
                     f"train.warmup_steps={max(1, grid.steps // 10)}", f"train.eval_every={grid.steps}", *sweep.overrides]
        runs.append(Run(params, sweep.base_path, overrides))
    return runs


def accelerated(model: torch.nn.Module, name: str, sweep: DiffusionSweep):
    """The handle of acceleration ``name`` applied to ``model`` (None for ``none``); ValueError when it does not apply."""
    from zoo.acceleration import deepcache, tome_sd

    return {"none": lambda: None, "deepcache": lambda: deepcache(model, **sweep.deepcache),
            "tome-sd": lambda: tome_sd(model, **sweep.tome_sd)}[name]()


@register_reproduction("diffusion-shapes")
def diffusion_shapes(quick: bool, out_dir: Path, options: SweepOptions) -> dict[str, Any]:
    """Train each diffusion model of the sweep, then sample it (EMA weights) with every scheduler, step count and
    acceleration; passes when every configuration that applies gave finite metrics (a measurement, not a quality bar)."""
    import math

    from zoo.checkpoint import read_json
    from zoo.diffusion_eval import CLASSIFIER, evaluate_samples, load_classifier, reference_images
    from zoo.train import load_checkpoint_model
    from zoo.registry import checkpoint_root, split_tag
    from zoo.tasks import create_task

    sweep = load_sweep("diffusion-shapes", DiffusionSweep)
    grid = sweep.grid(quick, options)
    records = run_sweep(diffusion_runs(quick, options), out_dir, options)
    classifier, reference = load_classifier(), reference_images(grid.samples)
    classifier_accuracy = read_json(checkpoint_root().joinpath(*split_tag(CLASSIFIER), "config.json"))["metrics"]["val"]["accuracy"]
    rows = []
    for r in (r for r in records if r["status"] == "ok"):
        folder = latest_checkpoint(r["run_dir"])
        task_spec = read_json(folder / "config.json")["run"]["task"]
        task = create_task(task_spec["name"], **{k: v for k, v in task_spec.items() if k != "name"})
        model = load_checkpoint_model(folder, torch.device("cpu"), None)
        for acceleration in ("none", "deepcache", "tome-sd"):
            base = {"model": r["model"], "acceleration": acceleration}
            try:
                handle = accelerated(model, acceleration, sweep)
            except ValueError as e:
                rows.append({**base, "scheduler": None, "steps": None, "applies": False, "reason": str(e)})
                continue
            for scheduler, steps in product(sweep.schedulers, grid.sample_steps):
                metrics = evaluate_samples(model, grid.samples, steps, scheduler, sweep.guidance, classifier=classifier,
                                           reference=reference, task=task)
                rows.append({**base, "scheduler": scheduler, "steps": steps, "applies": True, **metrics})
            if handle is not None:
                handle.remove()
    measured = [r for r in rows if r["applies"]]
    finite = all(math.isfinite(r[k]) for r in measured for k in ("conditional_accuracy", "shapes_fid", "seconds_per_sample"))
    failed = [r for r in records if r["status"] != "ok"]
    passed = not failed and bool(measured) and finite
    (out_dir / "diffusion-shapes.md").write_text(diffusion_markdown(rows, grid, sweep, classifier_accuracy) + failures_markdown(records))
    return {"rows": rows, "classifier": CLASSIFIER, "classifier_val_accuracy": classifier_accuracy,
            "samples": grid.samples, "steps": grid.steps, "guidance": sweep.guidance, "failed": failed,
            "passed": passed, "results": str(out_dir / RESULTS), "table": str(out_dir / "diffusion-shapes.md")}


def diffusion_markdown(rows: list[dict[str, Any]], grid: DiffusionGrid, sweep: DiffusionSweep, classifier_accuracy: float) -> str:
    lines = [f"| {r['model']} | {r['acceleration']} | {r['scheduler']} | {r['steps']} | {r['conditional_accuracy']:.3f} | "
             f"{r['shapes_fid']:.2f} | {r['seconds_per_sample']:.4f} |" if r["applies"] else
             f"| {r['model']} | {r['acceleration']} | n/a | n/a | n/a | n/a | n/a ({r['reason']}) |" for r in rows]
    return (f"# Diffusion family on shapes: {grid.steps} training steps, {grid.samples} samples per row, "
            f"guidance {sweep.guidance:g}, EMA weights\n\n"
            f"Scored by the shipped classifier vit-tiny.shapes, whose recorded val accuracy is {classifier_accuracy:.3f}: "
            "conditional accuracy is bounded by it, and shapes-FID (its pre-logit features, not Inception) is comparable "
            "only within this table. Seconds per sample: sampling wall time / samples, CPU, one process.\n\n"
            "| model | acceleration | scheduler | steps | cond. accuracy | shapes-FID | s/sample |\n"
            "|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n")
