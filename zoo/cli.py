"""The ``zoo`` command: list, info, train, eval, sample, bench, reproduce."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import zoo


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_list(args) -> None:
    for name in zoo.list_models(args.pattern, pretrained=args.pretrained):
        print(name)


def cmd_info(args) -> None:
    info = zoo.model_info(args.name)
    layers = info.pop("layers")
    _print_json(info)
    print("layers:")
    for row in layers:
        state = f"  decoding state {row['state_size']:,} floats at max_seq_len" if "state_size" in row else ""
        backend = f"  backend {row['backend']}" if "backend" in row else ""
        print(f"  {row['layer']:>3}  {row['mixer']}{state}{backend}")


def cmd_train(args) -> None:
    from zoo.config import load_config
    from zoo.train import train

    metrics = train(load_config(args.config, args.overrides))
    _print_json(metrics)


def cmd_eval(args) -> None:
    from zoo.evaluate import evaluate_checkpoint

    _print_json(evaluate_checkpoint(args.run_dir, args.overrides))


def cmd_sample(args) -> None:
    from zoo.sampling import sample_checkpoint

    path = sample_checkpoint(args.run_dir, args.n, args.steps, args.scheduler, args.guidance, args.out, args.seed,
                             args.device, args.ema, args.caption)
    print(f"samples written to {path}")


def cmd_bench(args) -> None:
    from zoo.bench import benchmark, write_results

    rows = benchmark(args.names, device=args.device, dtype=args.dtype, batch=args.batch, seq_lens=tuple(args.seq_lens),
                     compile=args.compile, iters=args.iters, dim=args.dim, num_heads=args.heads)
    paths = write_results(rows, args.out, plot=args.plot)
    print(paths["md"].read_text())
    print(f"results written to {', '.join(str(p) for p in paths.values())}")


def _comma_list(cast):
    """An argparse type: a comma-separated list of ``cast`` values."""

    def parse(text: str) -> list:
        return [cast(v) for v in text.split(",") if v]

    parse.__name__ = f"comma-separated {cast.__name__}"
    return parse


def _grid_axis(text: str) -> tuple[str, object]:
    """``axis=value`` with the value read as YAML."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected AXIS=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


def cmd_reproduce(args) -> None:
    from zoo.reproduce import reproduce

    result = reproduce(args.name, quick=args.quick, out_dir=args.out, jobs=args.jobs, devices=args.devices,
                       steps=args.steps, lrs=args.lrs, mixers=args.mixers, resume=args.resume, grid=dict(args.grid))
    _print_json(result)
    if not result.get("passed", True):
        sys.exit(1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoo", description="effzoo: efficient model architectures by name")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list registered models (fnmatch PATTERN)")
    p.add_argument("pattern", nargs="?", default="*")
    p.add_argument("--pretrained", action="store_true", help="list name.tag of shipped checkpoints")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("info", help="family, parameters, config, mixers and per-layer state of a model")
    p.add_argument("name")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="train from a YAML config with key.sub=value overrides")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run folder or checkpoint folder (overrides: split=, batch_size=, data.*)")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sample", help="sample a grid of images from a diffusion run folder or checkpoint folder")
    p.add_argument("run_dir")
    p.add_argument("--n", type=int, default=64, help="number of images")
    p.add_argument("--steps", type=int, default=25, help="denoising steps")
    p.add_argument("--scheduler", default="dpm", help="ddim, dpm or ddpm")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    p.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/samples.png)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="sample with the EMA weights (--no-ema: the raw weights; default: the EMA when the checkpoint has one)")
    p.add_argument("--caption", action="append", default=None,
                   help="a caption-conditioned model's caption (repeat for several; they take turns over the images; "
                        "default: the run's validation captions)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("bench", help="latency/throughput/memory/FLOPs of models or mixers, beside their peer")
    p.add_argument("names", nargs="+")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=None, help="throughput batch size (latency always uses batch 1)")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[1024])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--dim", type=int, default=1024, help="width of a mixer benchmarked as a layer")
    p.add_argument("--heads", type=int, default=16, help="heads of a mixer benchmarked as a layer")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--plot", action="store_true")
    p.add_argument("--out", default="runs/bench")
    p.set_defaults(func=cmd_bench)

    from zoo.reproduce import list_reproductions

    p = sub.add_parser("reproduce", help=f"run a reproduction ({', '.join(list_reproductions())})")
    p.add_argument("name")
    p.add_argument("--quick", action="store_true", help="the CPU-sized version")
    p.add_argument("--out", default=None)
    p.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process (1: one by one in this one)")
    p.add_argument("--devices", type=_comma_list(str), default=None,
                   help="GPU ids (0,1,2,3) dealt to the parallel runs round-robin as CUDA_VISIBLE_DEVICES")
    p.add_argument("--steps", type=int, default=None, help="training steps of every run, in place of the sweep's")
    p.add_argument("--lrs", type=_comma_list(float), default=None,
                   help="learning rates to sweep (1e-3,3e-3), in place of the sweep's")
    p.add_argument("--mixers", type=_comma_list(str), default=None, help="only these mixers of the sweep (attention,gla)")
    p.add_argument("--resume", action="store_true",
                   help="keep --out, skip the runs its results.jsonl holds as finished, and continue interrupted runs "
                        "from their last checkpoint")
    p.add_argument("--grid", type=_grid_axis, action="append", default=[], metavar="AXIS=YAML",
                   help="replace another axis of the grid: --grid 'widths=[64,128]' --grid 'lengths=[[512,64]]'")
    p.set_defaults(func=cmd_reproduce)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        print(f"zoo {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # the reader of our output left (`zoo list | head`): stop quietly, as Python's docs advise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        sys.exit(1)


if __name__ == "__main__":
    main()
