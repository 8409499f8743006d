"""Command line: `python -m worker.selftuning train --data PATH --out DIR ...`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from worker.selftuning.budgets import Budget, BudgetError
from worker.selftuning.config import PRESETS, RunConfig
from worker.selftuning.data import hold_out_items, load_folder_dataset, make_budget_data
from worker.selftuning.loop import train
from worker.selftuning.methods import METHODS

HOLDOUT_FRACTION = 0.2
HOLDOUT_SEED = 0  # the hold-out belongs to the dataset, not to a run: same for every seed


def parse_budget(text: str) -> Budget:
    """'0.05', '5%', '10/class' or 'all'."""
    text = text.strip()
    if text.endswith("/class"):
        count = text.removesuffix("/class")
        if not count.isdigit():
            raise BudgetError(f"budget {text!r}: write N/class with a whole number N")
        return Budget.parse({"per_class": int(count)})
    if text.endswith("%"):
        return Budget.parse(float(text[:-1]) / 100)
    return Budget.parse(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m worker.selftuning")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("train", help="train one run and export the model")
    run.add_argument("--data", required=True, help="folder, .zip or .tar(.gz) dataset")
    run.add_argument("--out", required=True, help="output folder (resumes if it has a state)")
    run.add_argument("--method", default="self-tuning", choices=sorted(METHODS))
    run.add_argument("--budget", default="0.05", help="0.05, 5%%, 10/class or all")
    run.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    run.add_argument("--iterations", type=int)
    run.add_argument("--image-size", type=int)
    run.add_argument("--seed", type=int)
    run.add_argument("--backbone")
    run.add_argument("--no-pretrained", action="store_true", help="random initialisation")
    run.add_argument("--device")
    run.add_argument("--num-workers", type=int)
    run.add_argument("--cpu-threads", type=int, help="torch threads on CPU (0: all cores)")
    run.add_argument("--cache-dir", help="keep decoded images here between runs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {
        "method": args.method,
        "iterations": args.iterations,
        "image_size": args.image_size,
        "seed": args.seed,
        "backbone": args.backbone,
        "device": args.device,
        "num_workers": args.num_workers,
        "cpu_threads": args.cpu_threads,
    }
    overrides = {key: value for key, value in overrides.items() if value is not None}
    if args.no_pretrained:
        overrides["pretrained"] = False
    try:
        config = RunConfig.from_preset(args.preset, **overrides)
        budget = parse_budget(args.budget)
        class_names, train_items, test_items, unlabeled = load_folder_dataset(args.data)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not test_items:
        train_items, test_items = hold_out_items(train_items, HOLDOUT_FRACTION, HOLDOUT_SEED)
        print(f"no test/ split: holding out {len(test_items)} labeled images for testing")
    data, budget_info = make_budget_data(class_names, train_items, test_items, unlabeled,
                                         budget, config.seed)
    print(f"{len(class_names)} classes, {budget_info['labeled_count']} labeled "
          f"({budget.label}), {budget_info['unlabeled_count']} unlabeled, "
          f"{budget_info['test_count']} test; {config.method} on {config.backbone}")
    metrics = train(config, data, Path(args.out), on_event=print_event,
                    metadata={"budget": budget_info, "dataset": str(args.data)},
                    cache_dir=Path(args.cache_dir) if args.cache_dir else None)
    summary = {key: metrics[key] for key in ("test_top1", "test_mean_class_acc",
                                              "pseudo_label_acc", "train_pseudo_label_acc",
                                              "seconds_per_iteration")}
    print("final " + json.dumps(summary))
    return 0


def print_event(event: dict) -> None:
    where = f"[{event['step']}/{event['total_steps']}]"
    if event["type"] == "progress":
        losses = " ".join(f"{name}={value:.4f}" for name, value in event["losses"].items())
        print(f"{where} {losses} lr={event['lr']:.2g} {event['images_per_s']:.1f} img/s",
              flush=True)
    elif event["type"] == "eval":
        shown = {k: v for k, v in event.items() if k not in ("type", "step", "total_steps")}
        print(f"{where} eval " + " ".join(f"{k}={_fmt(v)}" for k, v in shown.items()),
              flush=True)
    elif event["type"] == "started" and event.get("resumed_from_step") is not None:
        print(f"{where} resumed", flush=True)


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    raise SystemExit(main())
