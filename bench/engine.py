"""Benchmarks of the training engine: label budgets x methods on a dataset (animal-mnist
unless --data says otherwise), the cost of the PGC loss and queue, and the cost of a
Self-Tuning iteration against a fine-tuning one.

    python bench/engine.py                                   # everything (about 20 min on CPU)
    python bench/engine.py --budgets 0.05,4/class --methods self-tuning,fine-tune --seeds 0,1
    python bench/engine.py --skip-runs                       # micro-benchmarks only
    python bench/engine.py --validation 0.2 --set temperature=0.2   # choose a setting
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker.selftuning import (  # noqa: E402
    RunConfig,
    load_folder_dataset,
    make_budget_data,
    train,
)
from worker.selftuning.augment import ViewMaker  # noqa: E402
from worker.selftuning.backbones import create_backbone  # noqa: E402
from worker.selftuning.batches import StepBatches  # noqa: E402
from worker.selftuning.budgets import Budget, BudgetError  # noqa: E402
from worker.selftuning.cli import (  # noqa: E402
    BUDGET_FORMS,
    HOLDOUT_FRACTION,
    HOLDOUT_SEED,
    check_budget_fits,
    check_holdout_possible,
    parse_budget,
)
from worker.selftuning.data import drop_duplicates, hold_out_items  # noqa: E402
from worker.selftuning.images import ImageArray, Preprocessing  # noqa: E402
from worker.selftuning.methods import METHODS, Batch, build_method  # noqa: E402
from worker.selftuning.pgc import enqueue, pgc_loss  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "animal-mnist.zip"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--budgets", default="0.01,0.05,0.15",
                        # argparse formats help with %: "5%" would end it.
                        help=f"comma-separated, each {BUDGET_FORMS.replace('%', '%%')}")
    parser.add_argument("--methods", default="self-tuning,fine-tune,fixmatch")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--iterations", type=int)
    parser.add_argument("--backbone")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any RunConfig field, e.g. --set lr=0.002")
    parser.add_argument("--out", help="keep run folders here (default: a temp folder)")
    parser.add_argument("--cache-dir",
                        default=str(Path(tempfile.gettempdir()) / "selftuning-cache"))
    parser.add_argument("--validation", type=float, metavar="FRACTION",
                        help="score on a class-balanced hold-out of this share of the train "
                             "split instead of the test split (to choose settings)")
    parser.add_argument("--skip-runs", action="store_true")
    parser.add_argument("--skip-micro", action="store_true")
    args = parser.parse_args()
    try:  # before the micro-benchmarks, which take minutes
        budgets = [parse_budget(text) for text in args.budgets.split(",")]
    except BudgetError as exc:
        parser.error(str(exc))

    if not args.skip_micro:
        bench_pgc()
        bench_iteration_cost(args.backbone or RunConfig().backbone)
        if torch.cuda.is_available():
            bench_cuda_throughput(args.backbone or RunConfig().backbone)
    if not args.skip_runs:
        overrides = dict(_parse_assignment(item) for item in args.set)
        if args.iterations:
            overrides["iterations"] = args.iterations
        if args.backbone:
            overrides["backbone"] = args.backbone
        try:
            bench_budgets(args, budgets, overrides)
        except ValueError as exc:  # the dataset or a budget does not fit: as the CLI says it
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None


def bench_budgets(args: argparse.Namespace, budgets: list[Budget], overrides: dict) -> None:
    class_names, train_items, test_items, unlabeled = load_folder_dataset(args.data)
    train_items, test_items, unlabeled, dropped = drop_duplicates(
        train_items, test_items, unlabeled)
    if dropped:
        print(f"left out {len(dropped)} image(s) with the same bytes as another")
    split = "test"
    if args.validation:
        train_items, test_items = hold_out_items(train_items, args.validation, 0)
        split = f"validation ({len(test_items)} train images held out)"
    elif not test_items:
        # As the command line does, so that its numbers and these compare.
        check_holdout_possible(class_names, train_items)
        train_items, test_items = hold_out_items(train_items, HOLDOUT_FRACTION, HOLDOUT_SEED)
        split = (f"a hold-out of {len(test_items)} train images (the dataset has no test/ "
                 "split)")
    for budget in budgets:
        check_budget_fits(budget, train_items)
    methods = args.methods.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    out_root = Path(args.out or tempfile.mkdtemp(prefix="selftuning-bench-"))
    rows = []
    for budget in budgets:
        for seed in seeds:
            data, info = make_budget_data(class_names, train_items, test_items, unlabeled,
                                          budget, seed)
            for method in methods:
                config = RunConfig.from_preset(args.preset, method=method, seed=seed, **overrides)
                out = out_root / f"{method}-{budget.label.replace('/', '-per-')}-seed{seed}"
                started = time.perf_counter()
                metrics = train(config, data, out, metadata={"budget": info},
                                cache_dir=Path(args.cache_dir))
                rows.append({
                    "budget": budget.label, "method": method, "seed": seed,
                    "labeled": info["labeled_count"],
                    "top1": metrics["test_top1"],
                    "pseudo": metrics["pseudo_label_acc"],
                    "train_pseudo": metrics["train_pseudo_label_acc"],
                    "s_per_it": metrics["seconds_per_iteration"],
                    "wall": time.perf_counter() - started,
                })
                print(_row(rows[-1]), flush=True)
    print(f"\n{args.data}, preset {args.preset} {overrides or ''}, scored on {split}, "
          f"runs in {out_root}")
    print(f"{'budget':>7} {'method':<12} {'seed':>4} {'labeled':>7} {'top-1':>7} "
          f"{'pseudo':>7} {'train-pl':>8} {'s/it':>6} {'wall s':>7}")
    for row in rows:
        print(_row(row))
    cache = [path for path in Path(args.cache_dir).glob("*.npy")]
    print(f"decoded-image cache {args.cache_dir}: {len(cache)} files, "
          f"{sum(path.stat().st_size for path in cache) / 2**20:.0f} MiB")
    if len(seeds) > 1:
        print("\nmean over seeds")
        for budget in budgets:
            for method in methods:
                top1 = [r["top1"] for r in rows
                        if r["budget"] == budget.label and r["method"] == method]
                print(f"{budget.label:>7} {method:<12} top-1 {statistics.mean(top1):.2%} "
                      f"(min {min(top1):.2%}, max {max(top1):.2%})")


def _row(row: dict) -> str:
    def pct(value: float | None) -> str:
        return "   n/a" if value is None else f"{value:.1%}"

    return (f"{row['budget']:>7} {row['method']:<12} {row['seed']:>4} {row['labeled']:>7} "
            f"{pct(row['top1']):>7} {pct(row['pseudo']):>7} {pct(row['train_pseudo']):>8} "
            f"{row['s_per_it'] or 0:>6.3f} {row['wall']:>7.0f}")


def authors_style_pgc(query, key, labels, queue, pointers, temperature):
    """The public code's loop, transcribed: per sample, cut a snapshot of the queue into the
    keys of its class and all the others, score both, grow the logit lists, and enqueue
    that sample's key; then one log-softmax over [own, positives, negatives]."""
    num_classes, queue_size, dim = queue.shape
    snapshot = queue.reshape(num_classes * queue_size, dim).t().clone()
    own = (query * key).sum(dim=1, keepdim=True)
    positive_list = query.new_empty(0, queue_size)
    negative_list = query.new_empty(0, (num_classes - 1) * queue_size)
    for i in range(len(labels)):
        c = int(labels[i])
        negatives = torch.cat([snapshot[:, : c * queue_size],
                               snapshot[:, (c + 1) * queue_size :]], dim=1)
        positives = snapshot[:, c * queue_size : (c + 1) * queue_size]
        positive_list = torch.cat([positive_list, query[i : i + 1] @ positives])
        negative_list = torch.cat([negative_list, query[i : i + 1] @ negatives])
        with torch.no_grad():
            queue[c, pointers[c]] = key[i]
            pointers[c] = (pointers[c] + 1) % queue_size
    logits = torch.cat([own, positive_list, negative_list], dim=1) / temperature
    return -torch.log_softmax(logits, dim=1)[:, : queue_size + 1].mean(dim=1).mean()


def lean_per_sample_pgc(query, key, labels, queue, temperature):
    """A leaner per-sample loop: one matrix-vector product per sample, no copies."""
    queue_size = queue.shape[1]
    flat = queue.reshape(-1, queue.shape[2])
    losses = []
    for i in range(len(labels)):
        scores = torch.cat([(query[i] * key[i]).sum().view(1), flat @ query[i]]) / temperature
        log_prob = torch.log_softmax(scores, dim=0)
        first = 1 + int(labels[i]) * queue_size
        positives = torch.cat([log_prob[:1], log_prob[first : first + queue_size]])
        losses.append(-positives.mean())
    return torch.stack(losses).mean()


@torch.no_grad()
def per_sample_enqueue(queue, pointers, key, labels):
    for i in range(len(labels)):
        c = int(labels[i])
        queue[c, pointers[c]] = key[i]
        pointers[c] = (pointers[c] + 1) % queue.shape[1]


def bench_pgc(num_classes: int = 200, queue_size: int = 32, dim: int = 1024, batch: int = 24):
    """PGC loss (forward + backward) and enqueue for a labeled and an unlabeled batch of
    `batch` each, vectorised against per-sample loops; timings interleaved, best of 30."""
    torch.manual_seed(0)
    rows = 2 * batch
    queue = torch.nn.functional.normalize(torch.randn(num_classes, queue_size, dim), dim=2)
    pointers = torch.zeros(num_classes, dtype=torch.long)
    raw_query = torch.randn(rows, dim, requires_grad=True)
    key = torch.nn.functional.normalize(torch.randn(rows, dim), dim=1)
    labels = torch.randint(0, num_classes, (rows,))

    def vectorised():
        query = torch.nn.functional.normalize(raw_query, dim=1)
        pgc_loss(query, key, labels, queue, 0.07).mean().backward()
        enqueue(queue, pointers, key, labels)

    def authors():
        query = torch.nn.functional.normalize(raw_query, dim=1)
        authors_style_pgc(query, key, labels, queue, pointers, 0.07).backward()

    def lean():
        query = torch.nn.functional.normalize(raw_query, dim=1)
        lean_per_sample_pgc(query, key, labels, queue, 0.07).backward()
        per_sample_enqueue(queue, pointers, key, labels)

    best = _interleaved({"vectorised": vectorised, "authors": authors, "lean": lean}, 30)
    fast = best["vectorised"]
    print(f"PGC loss + backward + enqueue, C={num_classes} K={queue_size} P={dim} "
          f"B={batch}+{batch}: vectorised {fast * 1e3:.2f} ms; authors' per-sample loop "
          f"{best['authors'] * 1e3:.1f} ms (x{best['authors'] / fast:.1f}); lean per-sample "
          f"loop {best['lean'] * 1e3:.1f} ms (x{best['lean'] / fast:.1f})")


def bench_iteration_cost(backbone: str, image_size: int = 64, batch: int = 16) -> None:
    """One training iteration (forward, backward, step, EMA, enqueue) of Self-Tuning against
    one of fine-tuning with the same labeled batch, on prepared tensors; interleaved."""
    iterations = {}
    for method in ("fine-tune", "self-tuning"):
        torch.manual_seed(0)
        config = RunConfig(method=method, backbone=backbone, pretrained=False,
                           image_size=image_size, batch_size=batch, unlabeled_batch_size=batch)
        model = build_method(config, create_backbone(backbone, 10, pretrained=False), 10)
        model.train()
        optimizer = torch.optim.SGD(model.parameter_groups(), lr=config.lr, momentum=0.9,
                                    nesterov=True, weight_decay=1e-4)
        images = torch.randn(batch, 3, image_size, image_size)
        unlabeled = len(model.unlabeled_views) > 0
        batch_data = Batch(
            labeled=[images.clone() for _ in model.labeled_views],
            targets=torch.randint(0, 10, (batch,)),
            labeled_index=torch.arange(batch),
            unlabeled=[images.clone() for _ in model.unlabeled_views],
            hidden=(torch.randint(0, 10, (batch,)) if unlabeled
                    else torch.empty(0, dtype=torch.long)),
            unlabeled_index=torch.arange(batch, 2 * batch),
        )

        def iteration(model=model, optimizer=optimizer, batch_data=batch_data):
            output = model.training_step(batch_data)
            optimizer.zero_grad(set_to_none=True)
            output.loss.backward()
            optimizer.step()
            model.after_step(output, batch_data)

        iterations[method] = iteration
    best = _interleaved(iterations, 12)
    ratio = best["self-tuning"] / best["fine-tune"]
    print(f"one iteration on CPU ({backbone}, {image_size} px, labeled batch {batch}, "
          f"{torch.get_num_threads()} threads, best of 12): fine-tune {best['fine-tune']:.3f} s, "
          f"self-tuning (+{batch} unlabeled) {best['self-tuning']:.3f} s, ratio x{ratio:.2f}")
    building = bench_batch_building(image_size, batch)
    print("building a batch (decode-free: crops, RandAugment, cut-out) in the main process: "
          + ", ".join(f"{method} {seconds * 1e3:.1f} ms" for method, seconds in building.items())
          + "; that is the most DataLoader workers could take off an iteration")


def bench_batch_building(image_size: int, batch: int) -> dict[str, float]:
    """Time to make one iteration's augmented uint8 batch from cached squares."""
    preprocessing = Preprocessing(image_size, (0.5,) * 3, (0.5,) * 3)
    generator = np.random.default_rng(0)
    squares = ImageArray(generator.integers(0, 255, (64, preprocessing.scale_size,
                                                     preprocessing.scale_size, 3), np.uint8))
    results = {}
    for method in ("fine-tune", "self-tuning", "fixmatch"):
        labeled_views, unlabeled_views = METHODS[method].views_for(RunConfig(method=method))
        dataset = StepBatches(
            labeled_squares=squares, labeled_targets=[0] * 64, unlabeled_squares=squares,
            unlabeled_hidden=[-1] * 64, labeled_views=labeled_views,
            unlabeled_views=unlabeled_views, batch_size=batch, unlabeled_batch_size=batch,
            seed=0, view_maker=ViewMaker(preprocessing), total_steps=1000,
        )
        steps = iter(range(1000))
        results[method] = _interleaved({method: lambda d=dataset, s=steps: d[next(s)]}, 20)[method]
    return results


def bench_cuda_throughput(backbone: str, image_size: int = 224, batch: int = 24) -> None:
    """Self-Tuning training images/s at 224 px with bf16 autocast and channels_last."""
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    for method in ("fine-tune", "self-tuning"):
        config = RunConfig.from_preset("paper", method=method, backbone=backbone,
                                       pretrained=False)
        model = build_method(config, create_backbone(backbone, 200, pretrained=False), 200)
        model.to(device, memory_format=torch.channels_last).train()
        optimizer = torch.optim.SGD(model.parameter_groups(), lr=config.lr, momentum=0.9,
                                    nesterov=True)
        images = torch.randn(batch, 3, image_size, image_size, device=device).contiguous(
            memory_format=torch.channels_last)
        unlabeled = len(model.unlabeled_views) > 0
        batch_data = Batch(
            labeled=[images.clone() for _ in model.labeled_views],
            targets=torch.randint(0, 200, (batch,), device=device),
            labeled_index=torch.arange(batch, device=device),
            unlabeled=[images.clone() for _ in model.unlabeled_views],
            hidden=(torch.randint(0, 200, (batch,), device=device) if unlabeled
                    else torch.empty(0, dtype=torch.long, device=device)),
            unlabeled_index=torch.arange(batch, 2 * batch, device=device),
        )

        def iteration(model=model, optimizer=optimizer, batch_data=batch_data):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                output = model.training_step(batch_data)
            optimizer.zero_grad(set_to_none=True)
            output.loss.backward()
            optimizer.step()
            model.after_step(output, batch_data)

        seconds = _timeit(iteration, repeats=30, warmup=10, sync=True)
        count = batch * (2 if unlabeled else 1)
        print(f"CUDA {torch.cuda.get_device_name()}: {method} {image_size} px bf16, batch "
              f"{batch}{'+' + str(batch) if unlabeled else ''}: {seconds * 1e3:.1f} ms/it, "
              f"{count / seconds:.0f} images/s")


def _interleaved(functions: dict, repeats: int, warmup: int = 3) -> dict[str, float]:
    """Best time of each function, run in turns so that load from other processes falls on
    all of them alike."""
    for fn in functions.values():
        for _ in range(warmup):
            fn()
    best = dict.fromkeys(functions, float("inf"))
    for _ in range(repeats):
        for name, fn in functions.items():
            started = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def _timeit(fn, repeats: int = 20, warmup: int = 3, sync: bool = False) -> float:
    for _ in range(warmup):
        fn()
    timings = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - started)
    return min(timings)  # the least disturbed run: other processes share these cores


def _parse_assignment(text: str) -> tuple[str, object]:
    import json

    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


if __name__ == "__main__":
    main()
