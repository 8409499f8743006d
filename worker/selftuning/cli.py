"""Command line: `python -m worker.selftuning train --data PATH --out DIR ...` trains a run;
`python -m worker.selftuning predict --model DIR --images PATH ...` labels images with one;
`python -m worker.selftuning export-onnx --model DIR --out model.onnx` writes it as ONNX."""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from worker.selftuning.backbones import (
    BackboneError,
    check_forward_batch,
    check_image_size,
    check_local_weights,
)
from worker.selftuning.budgets import PER_CLASS_TEXT, Budget, BudgetError
from worker.selftuning.checkpoint import check_compatible, check_same_budget
from worker.selftuning.config import PRESETS, RunConfig
from worker.selftuning.data import (
    COPIES_FOLDER,
    Item,
    RunData,
    drop_duplicates,
    hold_out_items,
    load_folder_dataset,
    make_budget_data,
    unpacked_folder,
)
from worker.selftuning.export import PREDICTION_ROW_COLUMNS
from worker.selftuning.files import (
    PREDICTIONS_FILE,
    TEST_PREDICTIONS_FILE,
    TRAINING_FILE,
    checkpoint_path,
    read_csv,
    replace_csv,
    write_json,
)
from worker.selftuning.labels_csv import class_name_warnings, untested_class_warnings
from worker.selftuning.loop import TrainingCancelled, resolve_device, train
from worker.selftuning.methods import METHODS
from worker.selftuning.predict import (
    exported_files,
    image_files,
    load_exported,
    predict,
)

HOLDOUT_FRACTION = 0.2
HOLDOUT_SEED = 0  # the hold-out belongs to the dataset, not to a run: same for every seed
BUDGET_FORMS = ("a fraction in (0, 1] such as 0.05, a percentage such as 5%, N/class such as "
                "4/class, or all")
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C
STOPPED_BEFORE_TRAINING = "stopped before training began: nothing was saved"
# What a semi-supervised method does without an unlabeled image, as the web warns it.
SEMI_SUPERVISED = {"self-tuning": "Self-Tuning trains on the labeled images alone",
                   "fixmatch": "FixMatch trains as fine-tuning does"}


def parse_budget(text: str) -> Budget:
    """'0.05', '5%', '10/class' or 'all'."""
    cleaned = text.strip()
    try:
        if per_class := PER_CLASS_TEXT.fullmatch(cleaned):
            return Budget.parse({"per_class": int(per_class[1])})
        if cleaned.endswith("%"):
            return Budget.parse(float(cleaned[:-1]) / 100)
        return Budget.parse(cleaned)
    except ValueError as exc:  # a BudgetError in the API's words, or not a number at all
        # A fraction too small to keep a label says so, in this command line's words (it
        # read "use a fraction in (0, 1]" of 5e-7, which is one).
        if "below" in str(exc):
            reason = str(exc).replace("{'per_class': 1}", "1/class")
            raise BudgetError(f"budget {text!r}: {reason}") from None
        raise BudgetError(f"budget {text!r}: use {BUDGET_FORMS}") from None


# What --model takes, for `predict` and `export-onnx`.
MODEL_HELP = ("a run's --out folder, the checkpoint zip a run's page downloads, or a folder with "
              "its config.json and model.safetensors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m worker.selftuning")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("train", help="train one run and export the model")
    # Each option says what it does when left out (the preset's value where it has one).
    presets = {name: make() for name, make in PRESETS.items()}
    defaults = RunConfig()
    run.add_argument("--data", required=True,
                     help="folder, .zip or .tar (.gz, .bz2, .xz) dataset")
    run.add_argument("--out", required=True, help="output folder (resumes if it has a state)")
    run.add_argument("--method", default="self-tuning", choices=sorted(METHODS),
                     help="default: %(default)s")
    run.add_argument("--budget", default="0.05",
                     help="0.05, 5%%, 10/class or all (default: %(default)s)")
    run.add_argument("--preset", default="quick", choices=sorted(PRESETS), help=(
        "; ".join(f"{name}: {config.image_size} px, {config.iterations:,} iterations"
                  for name, config in sorted(presets.items()))
        + " (default: %(default)s); the options below replace its values"))
    run.add_argument("--iterations", type=int, help="default: the preset's")
    run.add_argument("--image-size", type=int, help="in pixels (default: the preset's)")
    run.add_argument("--seed", type=int, help="which images the budget labels, and every "
                     f"random draw of the training (default: {defaults.seed})")
    run.add_argument("--backbone", help="a timm architecture, or a .safetensors file: "
                     "ARCH:FILE, or FILE with timm's config.json beside it "
                     f"(default: {defaults.backbone}, whose weights load offline)")
    run.add_argument("--no-pretrained", action="store_true", help="random initialisation")
    run.add_argument("--device", help="auto (a CUDA GPU when there is one, else the CPU), cpu, "
                     f"cuda or cuda:N (default: {defaults.device})")
    run.add_argument("--num-workers", type=int,
                     help="processes building the batches (0: none; -1: chosen for the device; "
                     f"default: {defaults.num_workers})")
    run.add_argument("--cpu-threads", type=int, help="torch threads on CPU (0: all cores; "
                     f"default: {defaults.cpu_threads})")
    run.add_argument("--cache-dir", help="keep decoded images here between runs (default: "
                     "none, they are decoded again)")

    label = commands.add_parser("predict", help="label images with a run's exported model")
    label.add_argument("--model", required=True, help=MODEL_HELP)
    label.add_argument("--images", required=True, nargs="+", help="image files, or folders "
                       "whose images (sub-folders' too) are labeled")
    label.add_argument("--out", help="write the CSV (path, label, confidence, margin) here "
                       "(default: print it)")
    label.add_argument("--device", default="auto", help="auto (a CUDA GPU when there is one, "
                       "else the CPU), cpu, cuda or cuda:N (default: %(default)s)")
    label.add_argument("--batch-size", type=int, default=64,
                       help="images per forward pass (default: %(default)s)")
    label.add_argument("--cpu-threads", type=int, default=0,
                       help="torch threads on CPU (0: all cores; default: %(default)s)")
    onnx = commands.add_parser("export-onnx", help="write a run's exported model as ONNX")
    onnx.add_argument("--model", required=True, help=MODEL_HELP)
    onnx.add_argument("--out", required=True, help="the .onnx file to write")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "predict":
        return label_images(args)
    if args.command == "export-onnx":
        return write_onnx(args)
    out = Path(args.out)
    try:
        config = RunConfig.from_preset(args.preset, **_overrides(args))
        budget = parse_budget(args.budget)
        check_out_folder(out)
        # Before the images are read: a model that cannot take this size (ViT at 64 px), a
        # batch batch norm cannot train on, or a name timm does not know.
        check_image_size(config.backbone, config.image_size)
        check_forward_batch(config.backbone, config.image_size, config.batch_size)
        check_local_weights(config.backbone)  # a junk or foreign .safetensors file
        resolve_device(config.device)  # "cuda" on a machine without one
        if args.cache_dir and Path(args.cache_dir).exists() and not Path(args.cache_dir).is_dir():
            raise ValueError(f"--cache-dir {args.cache_dir} is a file: give a folder")
        skipped: dict[str, str] = {}
        warnings: list[str] = []
        class_names, train_items, test_items, unlabeled = load_folder_dataset(
            args.data, skipped, warnings)
        # What an upload of the same would warn of.
        tested = {label for _, label in test_items}
        warnings += class_name_warnings(class_names, "run again") + untested_class_warnings(
            [name for index, name in enumerate(class_names) if test_items and index not in tested])
        for warning in warnings:
            print(as_in_archive(f"warning: {warning}", args.data))
        if skipped:
            print(as_in_archive(skipped_summary(skipped, ", as an upload does"), args.data))
        train_items, test_items, unlabeled, dropped = drop_duplicates(
            train_items, test_items, unlabeled)
        if dropped:
            path, kept = dropped[0]
            print(as_in_archive(f"left out {len(dropped)} image(s) with the same bytes as "
                                f"another (e.g. {path}, a copy of {kept})", args.data))
            check_every_class_trains(class_names, train_items)
        if not test_items:
            check_holdout_possible(class_names, train_items)
            train_items, test_items = hold_out_items(train_items, HOLDOUT_FRACTION,
                                                     HOLDOUT_SEED)
            print(f"no test/ split: holding out {len(test_items)} labeled images for testing")
        check_budget_fits(budget, train_items)
        data, budget_info = make_budget_data(class_names, train_items, test_items, unlabeled,
                                             budget, config.seed)
        check_finished_run(out, config, data, budget.label)
    except ValueError as exc:
        return _user_error(exc, args.data)
    except KeyboardInterrupt:  # while the dataset was read: --out is not made yet
        print(STOPPED_BEFORE_TRAINING, file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"{len(class_names)} classes, {budget_info['labeled_count']} labeled "
          f"({budget.label}), {budget_info['unlabeled_count']} unlabeled, "
          f"{budget_info['test_count']} test; {config.method} on {config.backbone}")
    if config.method in SEMI_SUPERVISED and budget_info["unlabeled_count"] == 0:
        print(f"warning: at budget {budget.label!r} no image is unlabeled (the budget keeps "
              "every label and the dataset has no unlabeled images): "
              f"{SEMI_SUPERVISED[config.method]}")  # with the data's warnings, on stdout
    created = _first_missing(out)
    progress = _Progress()
    ctrl_c = _StopOnCtrlC()

    def on_event(event: dict) -> None:
        ctrl_c.follow(event)
        progress(event)

    with ctrl_c:
        try:
            metrics = train(config, data, out, on_event=on_event, should_cancel=ctrl_c,
                            metadata={"budget": budget_info, "dataset": str(args.data)},
                            cache_dir=Path(args.cache_dir) if args.cache_dir else None)
            if Path(args.data).is_file():  # part of the export, which a Ctrl-C may stop
                name_images_as_in_the_archive(out, unpacked_folder(Path(args.data)))
        except TrainingCancelled as stopped:
            if ctrl_c.stage == SETUP:  # the images were being decoded
                return _stopped_before_training(out, created, ctrl_c.exit_code)
            print(f"stopped at step {stopped.step} of {config.iterations}; run the same "
                  "command again to resume", flush=True)
            return ctrl_c.exit_code
        except (KeyboardInterrupt, RuntimeError) as exc:
            # Stopped at once: wherever it landed, torch.save too (which reports it as a
            # RuntimeError; the checkpoint being written is then left unfinished, unused).
            if isinstance(exc, RuntimeError) and not ctrl_c.stopped_at_once:
                raise
            if ctrl_c.stage == SETUP:
                return _stopped_before_training(out, created, ctrl_c.exit_code)
            print(_stopped_at_once(out, ctrl_c.stage, config.iterations), file=sys.stderr)
            return ctrl_c.exit_code
        except (ValueError, OSError) as exc:
            # Set-up (device, backbone, images, checkpoint, folders) reports what the user
            # gave as a ValueError or the file system's OSError; one raised once training
            # has begun is a bug or a full disk: keep its traceback.
            if progress.started:
                raise
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            return _user_error(exc)
    summary = {key: metrics[key] for key in ("test_top1", "test_mean_class_acc",
                                              "pseudo_label_acc", "train_pseudo_label_acc",
                                              "seconds_per_iteration")}
    print("final " + json.dumps(summary))
    return 0


def label_images(args: argparse.Namespace) -> int:
    """`predict`: the CSV of the model's label for each image, printed or written to --out
    (whole or not at all); what was skipped and how long it took on stderr."""
    began = time.monotonic()
    out = Path(args.out) if args.out else None
    skipped: dict[str, str] = {}
    try:
        if out is not None and out.is_dir():
            raise ValueError(f"--out {out} is a folder: give the CSV file to write")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size}: give 1 or more")
        device = resolve_device(args.device)
        if args.cpu_threads > 0:
            torch.set_num_threads(args.cpu_threads)
        files = image_files([Path(path) for path in args.images], skipped)
        if not files:
            raise ValueError(f"no image in --images {' '.join(args.images)}")
        with exported_files(Path(args.model)) as folder:
            exported = load_exported(folder, device)
        rows = list(predict(exported, files, device, args.batch_size, skipped))
        if not rows:  # files named one by one are read only now
            path, reason = next(iter(skipped.items()))
            raise ValueError(f"none of the {len(files)} file(s) given opens as an image "
                             f"(e.g. {path}: {reason})")
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            replace_csv(out, PREDICTION_ROW_COLUMNS, rows)
    except (ValueError, OSError) as exc:
        return _user_error(exc)
    except KeyboardInterrupt:
        print("stopped: nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    if out is None:
        writer = csv.DictWriter(sys.stdout, fieldnames=PREDICTION_ROW_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    if skipped:
        print(skipped_summary(skipped), file=sys.stderr)
    print(f"labeled {len(rows):,} image(s) into {len(exported.label_names)} classes in "
          f"{_duration(time.monotonic() - began)}" + (f"; wrote {out}" if out else ""),
          file=sys.stderr)
    return 0


def write_onnx(args: argparse.Namespace) -> int:
    """`export-onnx`: the model as ONNX at --out (whole or not at all)."""
    from worker.selftuning.onnx_export import INPUT_NAME, OUTPUT_NAME, export_onnx

    out = Path(args.out)
    temp = out.with_name(f".{out.name}.tmp")
    try:
        if out.is_dir():
            raise ValueError(f"--out {out} is a folder: give the .onnx file to write")
        out.parent.mkdir(parents=True, exist_ok=True)
        with exported_files(Path(args.model)) as folder:
            export_onnx(folder, temp)
            _, height, width = json.loads((folder / "config.json").read_text())[
                "pretrained_cfg"]["input_size"]
        os.replace(temp, out)
    except (ValueError, OSError) as exc:
        return _user_error(exc)
    finally:
        temp.unlink(missing_ok=True)
    # The graph takes the size the model was trained at, no other: say which.
    print(f"wrote {out}: input {INPUT_NAME!r} (float32 images, batch x 3 x {height} x {width}, "
          f"normalised as config.json says), output {OUTPUT_NAME!r}", file=sys.stderr)
    return 0


def check_out_folder(out: Path) -> None:
    """--out must be new, empty, or a run folder of this engine (which resumes or re-exports),
    so that nothing else in it is overwritten."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a new or empty folder")
    existing = next(folder for folder in (out, *out.parents) if folder.exists())
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, so the folder cannot be made")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {existing} cannot be written to")
    is_run = (out / "state").is_dir() or (out / TRAINING_FILE).is_file()
    if out.is_dir() and not is_run and any(out.iterdir()):
        raise ValueError(f"--out {out} holds other files and no run of this engine (no state/ "
                         f"or {TRAINING_FILE}): use a new or empty folder")


def check_budget_fits(budget: Budget, train_items: list[Item]) -> None:
    """N/class over every class's count keeps every label under another name, as the web
    refuses it too."""
    sizes = list(Counter(label for _, label in train_items).values())
    if budget.over_every_class(sizes):
        largest = max(sizes)
        raise ValueError(f"budget {budget.label} is more than any class holds (the largest has "
                         f"{largest:,} labeled training images), so it keeps every label: use "
                         f"all, or at most {largest:,}/class")


def check_every_class_trains(class_names: list[str], train_items: list[Item]) -> None:
    """Every class keeps a training image once copies of other images are left out (a class
    whose images all copy another class's would be scored without ever being learnt)."""
    counts = Counter(label for _, label in train_items)
    empty = [name for index, name in enumerate(class_names) if not counts[index]]
    if empty:
        raise ValueError(
            f"class(es) {', '.join(map(repr, empty))} have no training image left once images "
            "with the same bytes as another were left out: their images are copies of other "
            "classes' images; remove the copies or the class")


def check_finished_run(out: Path, config: RunConfig, data: RunData, budget_label: str) -> None:
    """A finished run's folder whose training state was deleted (as the README suggests)
    takes only the same run again, which exports the same model; another run would replace
    its model and numbers without a word. (With the state, the loop checks the checkpoint.)"""
    if (out / "state").is_dir():
        return
    try:
        recorded = json.loads((out / TRAINING_FILE).read_text())
        saved_config, fingerprint = recorded["config"], recorded["data"]["fingerprint"]
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--out {out} holds a {TRAINING_FILE} this engine cannot read "
                         f"({type(exc).__name__}): use a new or empty folder") from None
    what = f"the finished run in --out {out}"
    check_compatible(saved_config, config.to_dict(), fingerprint, data.fingerprints(),
                     recorded["data"], data.counts(), what=what)
    check_same_budget((recorded.get("budget") or {}).get("budget_label"), budget_label, what)


def name_images_as_in_the_archive(out: Path, unpacked: Path) -> None:
    """predictions.csv and test_predictions.json name an archive's images by their paths in
    the archive: the engine read them from the unpacked copy in the temp folder, which may
    be deleted."""
    def in_archive(path: str) -> str:
        image = Path(path)
        return image.relative_to(unpacked).as_posix() if image.is_relative_to(unpacked) else path

    columns, rows = read_csv(out / PREDICTIONS_FILE)
    for row in rows:
        row["path"] = in_archive(row["path"])
    replace_csv(out / PREDICTIONS_FILE, columns, rows)
    tested = json.loads((out / TEST_PREDICTIONS_FILE).read_text())
    write_json(out / TEST_PREDICTIONS_FILE,
               [{**row, "path": in_archive(row["path"])} for row in tested])


def _stopped_at_once(out: Path, stage: str, iterations: int) -> str:
    if stage == FINISHING:
        return (f"stopped during the final evaluation and export: the training state after "
                f"all {iterations} steps is saved in {checkpoint_path(out)}, so the same "
                "command again only evaluates and exports")
    if checkpoint_path(out).is_file():
        return ("stopped at once; run the same command again to resume from the last "
                "checkpoint")
    return "stopped at once, before the first checkpoint: the same command starts over"


def _stopped_before_training(out: Path, created: Path | None,
                             exit_code: int = EXIT_INTERRUPTED) -> int:
    _remove_folders_made_for(out, created)
    message = STOPPED_BEFORE_TRAINING
    if checkpoint_path(out).is_file():
        message += f"; the checkpoint already in {out} is kept: the same command resumes from it"
    print(message, file=sys.stderr)
    return exit_code


def _remove_folders_made_for(out: Path, created: Path | None) -> None:
    """--out and the parents this run made for it (up to `created`), innermost first, while
    they are empty: a folder the user had, and anything in one, is not ours to delete."""
    if created is None:
        return
    for folder in (out, *out.parents):
        try:
            folder.rmdir()
        except OSError:  # not empty, or not there
            return
        if folder == created:
            return


def check_holdout_possible(class_names: list[str], train_items: list[Item]) -> None:
    """Without a test split every class gives one image to the hold-out and needs another
    to train on."""
    counts = Counter(label for _, label in train_items)
    too_few = [f"class {name!r} has {counts[index]} image"
               for index, name in enumerate(class_names) if counts[index] < 2]
    if too_few:
        raise ValueError(f"{', '.join(too_few)}: with no test/ split each class needs at "
                         "least 2 (one to train on, one to test)")


def _overrides(args: argparse.Namespace) -> dict:
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
    return overrides


SKIP_REASONS_SHOWN = 12


def skipped_summary(skipped: dict[str, str], how: str = "") -> str:
    """"skipped N file(s)" and a line per reason, the most files first: how many, why, and
    one of them (a run's log is where a data scientist looks for what went missing)."""
    by_reason: dict[str, list[str]] = {}
    for path, reason in skipped.items():
        by_reason.setdefault(reason, []).append(path)
    reasons = sorted(by_reason.items(), key=lambda item: -len(item[1]))
    lines = [f"skipped {len(skipped)} file(s){how}:"]
    lines += [f"  {len(paths)} × {reason} (e.g. {paths[0]})"
              for reason, paths in reasons[:SKIP_REASONS_SHOWN]]
    if len(reasons) > SKIP_REASONS_SHOWN:
        rest = sum(len(paths) for _, paths in reasons[SKIP_REASONS_SHOWN:])
        lines.append(f"  {rest} more for {len(reasons) - SKIP_REASONS_SHOWN} other reason(s)")
    return "\n".join(lines)


def as_in_archive(text: str, data: str) -> str:
    """A message that names the files of an archive's unpacked copy (in the temp folder,
    which the user never named: /tmp/selftuning-datasets/83f9e94b9aaf6644/cat/1.jpg) naming
    them by the archive and their paths in it: photos.zip: cat/1.jpg."""
    if not Path(data).is_file():
        return text
    copies = Path(tempfile.gettempdir()) / COPIES_FOLDER
    return re.sub(re.escape(str(copies)) + r"/[0-9a-f]{16}/", lambda _: f"{data}: ", text)


def _user_error(exc: ValueError | OSError, data: str | None = None) -> int:
    message = str(exc) if data is None else as_in_archive(str(exc), data)
    if isinstance(exc, BackboneError):  # the engine's advice names the API's field
        message = message.replace("pretrained=false", "--no-pretrained")
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USER_ERROR


def _first_missing(folder: Path) -> Path | None:
    """The outermost of `folder` and its parents that does not exist yet: what creating
    `folder` creates."""
    missing = None
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            break
        missing = candidate
    return missing


class _Progress:
    """Prints the run's events, with the time taken and left, and notes when training has
    begun (set-up is over)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.started = False
        self.clock = clock
        self.since: tuple[float, int] | None = None  # (time, step) training began or resumed

    def __call__(self, event: dict) -> None:
        if event["type"] == "started":
            self.started = True
            self.since = (self.clock(), event["step"])
        print_event(event, self.timing(event))

    def timing(self, event: dict) -> str:
        """'2 min 10 s, 4 min 30 s left' on progress lines (evaluations included)."""
        if event["type"] != "progress" or self.since is None:
            return ""
        began, first = self.since
        elapsed, done = self.clock() - began, event["step"] - first
        if done <= 0:
            return ""
        left = elapsed / done * (event["total_steps"] - event["step"])
        return f", {_duration(elapsed)}, {_duration(left)} left"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


SETUP, TRAINING, FINISHING = "set-up", "training", "finishing"


class _StopOnCtrlC:
    """What Ctrl-C does depends on the stage the run is in, which it follows from the loop's
    events. In set-up (model, images) there is nothing to save: the first Ctrl-C stops the
    decoding and training never begins. In training the first asks the loop to stop, which
    saves a resumable checkpoint first. Once the last step's state is saved only the final
    evaluation and export are left, which the same command redoes from it: the first stops
    at once. A second Ctrl-C always stops at once. SIGTERM (`kill`, `timeout`, `docker stop`,
    a batch scheduler's end of time) does what Ctrl-C does, and the exit status says which
    came (130 or 143). Data loader workers (forked, so they inherit the handler) leave the
    decision to the main process."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.stage = SETUP
        self.requested = False
        self.stopped_at_once = False
        self.exit_code = EXIT_INTERRUPTED
        self.pid = os.getpid()

    def follow(self, event: dict) -> None:
        """Moves to the stage `event` begins, and stops there if a Ctrl-C came before it."""
        at_end = event["step"] == event["total_steps"]
        if event["type"] == "started":
            if self.requested:  # still in set-up: stop before a step 0 checkpoint is saved
                self._stop_at_once()
            self.stage = FINISHING if at_end else TRAINING
        elif event["type"] == "checkpoint" and at_end:
            self.stage = FINISHING
            if self.requested:  # asked during the last step, whose state is now saved
                self._stop_at_once()

    def __enter__(self) -> _StopOnCtrlC:
        self.previous = {signum: signal.signal(signum, self._on_signal)
                         for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def __call__(self) -> bool:
        return self.requested

    def _on_signal(self, signum: int, frame: object) -> None:
        if os.getpid() != self.pid:
            return
        self.exit_code = 128 + signum  # as shells report it: 130 Ctrl-C, 143 SIGTERM
        if self.requested or self.stage == FINISHING:
            self._stop_at_once()
        self.requested = True
        doing = (b"stopping after this step and saving" if self.stage == TRAINING
                 else b"stopping before training begins, with nothing to save")
        again = (b"; Ctrl-C again to stop at once\n" if signum == signal.SIGINT
                 else b" (SIGTERM); a second stops at once\n")
        # os.write: print() here could re-enter a print the signal interrupted.
        os.write(sys.stderr.fileno(), doing + again)

    def _stop_at_once(self) -> None:
        self.stopped_at_once = True
        raise KeyboardInterrupt


def print_event(event: dict, timing: str = "") -> None:
    where = f"[{event['step']}/{event['total_steps']}]"
    if event["type"] == "progress":
        losses = " ".join(f"{name}={value:.4f}" for name, value in event["losses"].items())
        print(f"{where} {losses} lr={event['lr']:.2g} {event['images_per_s']:.1f} img/s"
              f"{timing}", flush=True)
    elif event["type"] == "eval":
        # A score the method has none of (fine-tuning's pseudo-labels) is left out, not "None".
        shown = {k: v for k, v in event.items()
                 if k not in ("type", "step", "total_steps") and v is not None}
        # Training's pseudo-labels (since the previous evaluation), as the final line names
        # them; its pseudo_label_acc is the final model's, on the images the budget hid.
        shown = {("train_pseudo_label_acc" if k == "pseudo_label_acc" else k): v
                 for k, v in shown.items()}
        print(f"{where} eval " + " ".join(f"{k}={_fmt(v)}" for k, v in shown.items()),
              flush=True)
    elif event["type"] == "stage":  # decoding or labeling many images, before or after
        print(f"{where} {event['stage']} images {event['done']:,}/{event['total']:,}",
              flush=True)
    elif event["type"] == "started" and event.get("resumed_from_step") is not None:
        print(f"{where} resumed", flush=True)
    elif event["type"] == "started" and event.get("checkpoint_unreadable"):
        print(f"{where} {event['checkpoint_unreadable']}", flush=True)  # "...from step 0"


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    raise SystemExit(main())
