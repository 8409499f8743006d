"""The training loop (`train`): one run from images to exported model, with events,
checkpoints, cancellation and exact resume."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from worker.selftuning.augment import Normalize, ViewMaker
from worker.selftuning.backbones import create_backbone
from worker.selftuning.batches import (
    StepBatches,
    loader_processes,
    start_batches,
    to_device_batch,
)
from worker.selftuning.checkpoint import (
    CheckpointUnreadable,
    check_compatible,
    check_same_budget,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from worker.selftuning.config import RunConfig
from worker.selftuning.data import RunData
from worker.selftuning.export import (
    architecture_of,
    export_model,
    package_versions,
    write_predictions,
)
from worker.selftuning.files import (
    PREDICTIONS_FILE,
    TEST_PREDICTIONS_FILE,
    TRAINING_FILE,
    checkpoint_path,
    write_json,
)
from worker.selftuning.images import (
    DecodingStopped,
    ImageArray,
    Preprocessing,
    Progress,
    center_crop_array,
    counted_on,
    decode_all,
    decode_pool,
    eval_crops_in_chunks,
)
from worker.selftuning.methods import Method, build_method
from worker.selftuning.metrics import (
    PseudoLabelTracker,
    TopClasses,
    accuracy,
    classification_metrics,
    predict,
    pseudo_label_quality,
    queue_purity,
    top_classes,
)
from worker.selftuning.pixels import white_level_of

EventHandler = Callable[[dict], None]
# Queue purity re-predicts the queued images; beyond this many keys it uses an even sample.
PURITY_SAMPLE = 2048
STAGE_EVERY_S = 2.0  # how often a stage of work outside the steps says how far it is


class TrainingCancelled(Exception):
    """`should_cancel()` said stop. The training state was saved first, so calling `train`
    again with the same out_dir continues from `step`."""

    def __init__(self, step: int):
        super().__init__(f"training cancelled at step {step}")
        self.step = step


@dataclass
class RunImages:
    """The run's images decoded once: training squares and exact eval crops for test."""

    labeled: ImageArray
    unlabeled: ImageArray
    test: ImageArray
    image_size: int

    def eval_pixels(self, train_indices: np.ndarray) -> np.ndarray:
        """Centre crops of training images by train index (labeled first, then unlabeled)."""
        count = len(self.labeled)
        crops = [
            self.labeled[index] if index < count else self.unlabeled[index - count]
            for index in train_indices.tolist()
        ]
        if not crops:
            return np.empty((0, self.image_size, self.image_size, 3), dtype=np.uint8)
        return center_crop_array(np.stack(crops), self.image_size)


def train(
    config: RunConfig,
    data: RunData,
    out_dir: str | os.PathLike,
    on_event: EventHandler | None = None,
    should_cancel: Callable[[], bool] | None = None,
    metadata: dict | None = None,
    cache_dir: Path | None = None,
) -> dict:
    """Train one run and write its outputs to `out_dir`; returns the final metrics.

    Continues from `out_dir/state/checkpoint.pt` when it exists. Raises `TrainingCancelled`
    (after saving the training state) when `should_cancel()` returns True.
    """
    data.validate()
    json.dumps(metadata or {}, allow_nan=False)  # fail now, not after training, if not JSON
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    emit = _Emitter(on_event, config.iterations)
    device = resolve_device(config.device)
    with _thread_budget(device, config.cpu_threads):
        _seed_everything(config.seed)
        backbone = create_backbone(config.backbone, data.num_classes, pretrained=config.pretrained)
        preprocessing = dataclasses.replace(
            Preprocessing.from_model(backbone, config.image_size),
            white_level=white_level_of(
                path for items in (data.labeled, data.unlabeled, data.test) for path, _ in items),
        )
        try:
            images = _decode(data, preprocessing, cache_dir, should_cancel,
                             _StageReporter(emit, 0, "decoding"))
        except DecodingStopped:
            raise TrainingCancelled(0) from None
        model = build_method(config, backbone, data.num_classes)
        precision = precision_for(device)
        memory_format = precision.memory_format
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input sizes: pick the fastest kernels
        model.to(device=device, memory_format=memory_format)
        normalize = Normalize(preprocessing.mean, preprocessing.std).to(device)
        optimizer = _make_optimizer(model, config)
        tracker = PseudoLabelTracker()
        state_file = checkpoint_path(out_dir)
        step, resumed_from, unreadable, timing = 0, None, None, {}
        budget_label = ((metadata or {}).get("budget") or {}).get("budget_label")
        if state_file.is_file():
            try:
                step, timing = _restore(state_file, config, data, model, optimizer, tracker,
                                        budget_label)
                resumed_from = step
            except CheckpointUnreadable as exc:  # set aside, nothing restored: start afresh
                unreadable = str(exc)
        extra = {"checkpoint_unreadable": unreadable} if unreadable else {}
        loaders = loader_processes(config.num_workers, device)
        emit("started", step, resumed_from_step=resumed_from, loader_processes=loaders, **extra)

        def save(at_step: int) -> None:
            save_checkpoint(state_file, {
                "step": at_step,
                "config": config.to_dict(),
                "data_fingerprint": data.fingerprint(),
                "data_counts": data.counts(),
                "budget_label": budget_label,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": {"milestones": config.milestone_steps(), "gamma": config.lr_gamma},
                "tracker": tracker.state_dict(),
                "data_order": {"seed": config.seed, "next_step": at_step},
                "timing": window.timing(),
            })
            emit("checkpoint", at_step, path=str(state_file))

        dataset = StepBatches(
            labeled_squares=images.labeled,
            labeled_targets=[label for _, label in data.labeled],
            unlabeled_squares=images.unlabeled,
            unlabeled_hidden=[-1 if label is None else label for _, label in data.unlabeled],
            labeled_views=model.labeled_views,
            unlabeled_views=model.unlabeled_views,
            batch_size=config.batch_size,
            unlabeled_batch_size=config.unlabeled_batch_size,
            seed=config.seed,
            view_maker=ViewMaker(preprocessing),
            total_steps=config.iterations,
        )
        evaluator = _Evaluator(model, images, data, normalize, device, memory_format)
        window = _LogWindow(**timing)
        model.train()
        with _batches(dataset, step, loaders, device) as batches:
            while step < config.iterations:
                if should_cancel is not None and should_cancel():
                    save(step)
                    raise TrainingCancelled(step)
                batch = to_device_batch(next(batches), normalize, device, memory_format)
                _set_learning_rate(optimizer, config, step)
                with precision.autocast(device):
                    output = model.training_step(batch)
                optimizer.zero_grad(set_to_none=True)
                output.loss.backward()
                optimizer.step()
                model.after_step(output, batch)
                tracker.update(output, batch.hidden)
                step += 1
                window.add(output.terms, len(batch.targets) + len(batch.hidden))
                if step % config.log_interval == 0 or step == config.iterations:
                    emit("progress", step, **window.take(optimizer))
                with window.paused():  # evaluation and saving are not training throughput
                    if step % config.eval_interval == 0 and step < config.iterations:
                        emit("eval", step, **evaluator.interim(tracker))
                    if step % config.checkpoint_interval == 0 or step == config.iterations:
                        save(step)
        # Every step is trained (and saved): a cancel that came during the last one stops the
        # run here, before the final evaluation and the export.
        if should_cancel is not None and should_cancel():
            raise TrainingCancelled(step)
        return _finish(out_dir, config, data, model, preprocessing, evaluator, tracker, emit,
                       metadata, window.seconds_per_iteration, cache_dir)


def _make_optimizer(model: Method, config: RunConfig) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum over the method's parameter groups."""
    optimizer = torch.optim.SGD(
        model.parameter_groups(),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.momentum > 0,
        weight_decay=config.weight_decay,
    )
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return optimizer


def _restore(state_file: Path, config: RunConfig, data: RunData, model: Method,
             optimizer: torch.optim.Optimizer, tracker: PseudoLabelTracker,
             budget_label: str | None) -> tuple[int, dict]:
    """Load a training state into the freshly built run; returns the step it had reached
    and the training time up to it (`_LogWindow.timing`)."""
    state = load_checkpoint(state_file)
    check_compatible(state["config"], config.to_dict(), state["data_fingerprint"],
                     data.fingerprints(), state.get("data_counts"), data.counts())
    check_same_budget(state.get("budget_label"), budget_label)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    tracker.load_state_dict(state["tracker"])
    restore_rng(state["rng"])
    return int(state["step"]), state.get("timing", {})  # older states have none


@dataclass(frozen=True)
class Precision:
    """How a device runs the training step: the autocast dtype (None: float32 throughout) and
    the memory layout of the model and its inputs. Evaluation and export are float32."""

    autocast_dtype: torch.dtype | None
    memory_format: torch.memory_format

    def autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)


def precision_for(device: torch.device) -> Precision:
    """bf16 autocast and channels_last on CUDA (tensor cores); float32 on the CPU."""
    if device.type == "cuda":
        return Precision(torch.bfloat16, torch.channels_last)
    return Precision(None, torch.contiguous_format)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but no CUDA GPU is available")
    return device


def device_name(device: torch.device) -> str:
    """"cpu", or the GPU by index and name: "cuda:0 (NVIDIA H100 80GB HBM3)"."""
    if device.type != "cuda":
        return device.type
    index = torch.cuda.current_device() if device.index is None else device.index
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


class _StageReporter:
    """`stage` events for the work outside the steps that takes minutes on a large dataset:
    decoding the images before the first step (`decoding`), and after the last step the
    unlabeled images' eval crops (`decoding` again) and labeling them for predictions.csv
    (`labeling`). Each
    says how many of how many images are done, every STAGE_EVERY_S seconds and when all are,
    once the stage has taken that long (a short one says nothing). The training step is the
    run's (0 at set-up, the last at the end)."""

    def __init__(self, emit: _Emitter, step: int, stage: str) -> None:
        self.emit, self.step, self.stage = emit, step, stage
        self.began = self.last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.began >= STAGE_EVERY_S and (now - self.last >= STAGE_EVERY_S
                                                  or done == total):
            self.last = now
            self.emit("stage", self.step, stage=self.stage, done=done, total=total)

    def to(self, stage: str) -> _StageReporter:
        return _StageReporter(self.emit, self.step, stage)


class _Emitter:
    """Sends JSON-safe event dicts with type, step and total_steps."""

    def __init__(self, handler: EventHandler | None, total_steps: int):
        self.handler = handler
        self.total_steps = total_steps

    def __call__(self, kind: str, step: int, **fields: object) -> None:
        if self.handler is not None:
            self.handler({"type": kind, "step": step, "total_steps": self.total_steps,
                          **fields})


class _LogWindow:
    """Loss terms and throughput since the last progress event; also adds up the run's
    training time, leaving out the time spent `paused()` (evaluation, checkpoints)."""

    def __init__(self, seconds: float = 0.0, iterations: int = 0) -> None:
        # Training time and the iterations it covers, since the run began (a resumed run
        # starts from its checkpoint's figures).
        self.training_seconds = seconds
        self.timed_iterations = iterations
        self._reset()

    def timing(self) -> dict:
        return {"seconds": self.training_seconds, "iterations": self.timed_iterations}

    @property
    def seconds_per_iteration(self) -> float | None:
        if not self.timed_iterations:
            return None
        return self.training_seconds / self.timed_iterations

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.iterations = 0
        self.images = 0
        self.started = time.perf_counter()
        self.paused_seconds = 0.0

    @contextmanager
    def paused(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.paused_seconds += time.perf_counter() - started

    def add(self, terms: dict[str, torch.Tensor], images: int) -> None:
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0) + value.detach().float()
        self.iterations += 1
        self.images += images

    def take(self, optimizer: torch.optim.Optimizer) -> dict:
        # float() waits for the device, so the time below includes all queued work.
        losses = {name: float(total) / self.iterations for name, total in self.sums.items()}
        elapsed = time.perf_counter() - self.started - self.paused_seconds
        self.training_seconds += elapsed
        self.timed_iterations += self.iterations
        bad = [name for name, value in losses.items() if not math.isfinite(value)]
        if bad:
            raise FloatingPointError(
                f"loss term(s) {bad} became {losses[bad[0]]}: the learning rate is too high "
                "for this data"
            )
        mask_rate = losses.pop("mask_rate", None)
        event = {
            "losses": losses,
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": self.images / elapsed if elapsed > 0 else None,
        }
        if mask_rate is not None:
            event["mask_rate"] = mask_rate
        self._reset()
        return event


PREDICT_CHUNK = 512  # images per forward pass when predicting many


class _Evaluator:
    """Test accuracy, queue purity and pseudo-label statistics of the current model."""

    def __init__(self, model: Method, images: RunImages, data: RunData, normalize: Normalize,
                 device: torch.device, memory_format: torch.memory_format):
        self.model = model
        self.images = images
        self.data = data
        self.normalize = normalize
        self.device = device
        self.memory_format = memory_format
        self.test_truth = torch.tensor([label for _, label in data.test], dtype=torch.long)

    def predict(self, pixels: np.ndarray, memory_format: torch.memory_format | None = None
                ) -> torch.Tensor:
        return predict(self.model.backbone, pixels, self.normalize, self.device,
                       memory_format=memory_format or self.memory_format)

    def test_scores(self, memory_format: torch.memory_format | None = None
                    ) -> tuple[dict, torch.Tensor]:
        probabilities = self.predict(self.images.test[:], memory_format)
        predicted = probabilities.argmax(dim=1)
        return (classification_metrics(predicted, self.test_truth, self.data.num_classes),
                predicted)

    def predict_train_images(self, train_indices: np.ndarray,
                             memory_format: torch.memory_format | None = None) -> torch.Tensor:
        """Probabilities for training images, a chunk at a time to bound memory."""
        return self._predict_chunks(
            (self.images.eval_pixels(train_indices[start : start + PREDICT_CHUNK])
             for start in range(0, len(train_indices), PREDICT_CHUNK)), memory_format)

    def predict_unlabeled(self, preprocessing: Preprocessing, cache_dir: Path | None,
                          memory_format: torch.memory_format | None = None,
                          labeling: _StageReporter | None = None) -> TopClasses:
        """The two most probable classes of each unlabeled image file, decoded as timm's
        eval transform decodes them (the training squares' centre crops differ slightly:
        JPEGs drafted, crops rounded twice). With a cache folder the crops of the whole
        training pool are kept there like the test set's, for the other runs on these images,
        whatever their budget; without one they are decoded a chunk at a time and dropped.
        `labeling` hears how far the labeling is, and (with a cache folder) its `decoding`
        stage how far the decoding before it is."""
        paths = [path for path, _ in self.data.unlabeled]
        if cache_dir is not None:
            labeled = [path for path, _ in self.data.labeled]
            crops = decode_pool([labeled, paths], "eval", preprocessing, cache_dir,
                                on_progress=None if labeling is None
                                else labeling.to("decoding"))[1]
            pixels = (crops[start : start + PREDICT_CHUNK]
                      for start in range(0, len(crops), PREDICT_CHUNK))
        else:
            pixels = eval_crops_in_chunks(paths, preprocessing, PREDICT_CHUNK)
        # Filled in place: small results kept between the chunks' large probabilities stopped
        # the allocator from reusing their memory, which then grew as if all were kept.
        k = min(2, self.data.num_classes)
        top = TopClasses(torch.empty(len(paths), k), torch.empty(len(paths), k, dtype=torch.long))
        start = 0
        for chunk in pixels:
            values, indices = top_classes(self.predict(chunk, memory_format), k)
            top.values[start : start + len(values)] = values
            top.indices[start : start + len(values)] = indices
            start += len(values)
            if labeling is not None:
                labeling(start, len(paths))
        return top

    def _predict_chunks(self, pixels: Iterator[np.ndarray],
                        memory_format: torch.memory_format | None) -> torch.Tensor:
        """Probabilities for images a chunk at a time, to bound memory."""
        chunks = [self.predict(chunk, memory_format) for chunk in pixels]
        if not chunks:
            return torch.empty(0, self.data.num_classes)
        return torch.cat(chunks)

    def queue_purity(self) -> tuple[float | None, float | None]:
        entries = self.model.queue_entries()
        if entries is None:
            return None, None
        classes, sources, truth = (t.cpu() for t in entries)
        if len(classes) > PURITY_SAMPLE:
            chosen = torch.linspace(0, len(classes) - 1, PURITY_SAMPLE).long()
            classes, sources, truth = classes[chosen], sources[chosen], truth[chosen]
        unique, position = torch.unique(sources, return_inverse=True)
        predicted = self.predict_train_images(unique.numpy()).argmax(dim=1)
        pseudo = sources >= len(self.data.labeled)  # unlabeled images follow the labeled ones
        return queue_purity(classes, predicted[position], truth, pseudo)

    def interim(self, tracker: PseudoLabelTracker) -> dict:
        scores, _ = self.test_scores()
        return self.event(scores, tracker)

    def event(self, scores: dict, tracker: PseudoLabelTracker) -> dict:
        window = tracker.take_window()
        event = {
            "test_top1": scores["test_top1"],
            "test_mean_class_acc": scores["test_mean_class_acc"],
            "pseudo_label_acc": window["pseudo_label_acc"],
        }
        if self.model.name == "fixmatch":
            event["fixmatch_mask_rate"] = window["used_rate"]
        if self.model.name == "self-tuning":
            event["queue_purity"], event["queue_purity_truth"] = self.queue_purity()
        return event


def _finish(out_dir: Path, config: RunConfig, data: RunData, model: Method,
            preprocessing: Preprocessing, evaluator: _Evaluator, tracker: PseudoLabelTracker,
            emit: _Emitter, metadata: dict | None, seconds_per_iteration: float | None,
            cache_dir: Path | None) -> dict:
    """Final scores with the model as exported (fp32, timm's own memory layout), the exported
    files, and the last eval event."""
    backbone = model.backbone
    backbone.to(memory_format=torch.contiguous_format)
    export_model(out_dir, backbone, data.class_names, preprocessing)
    scores, test_predicted = evaluator.test_scores(torch.contiguous_format)
    # Per test image: its path, its class and the exported model's answer, by name.
    write_json(out_dir / TEST_PREDICTIONS_FILE, [
        {"path": path, "label": data.class_names[label],
         "predicted": data.class_names[predicted]}
        for (path, label), predicted in zip(data.test, test_predicted.tolist(), strict=True)])

    # The exported model's answers for the unlabeled images, as a timm user would get them.
    top = evaluator.predict_unlabeled(preprocessing, cache_dir, torch.contiguous_format,
                                      _StageReporter(emit, config.iterations, "labeling"))
    hidden_labels = [label for _, label in data.unlabeled]
    hidden = torch.tensor([-1 if label is None else label for label in hidden_labels],
                          dtype=torch.long)
    write_predictions(out_dir / PREDICTIONS_FILE, [path for path, _ in data.unlabeled],
                      top, data.class_names, hidden_labels)
    labeled_targets = torch.tensor([label for _, label in data.labeled], dtype=torch.long)
    quality = pseudo_label_quality(top, hidden, labeled_targets, data.num_classes)
    final_event = evaluator.event(scores, tracker)
    if model.name == "self-tuning":
        quality["queue_purity"] = final_event["queue_purity"]
        quality["queue_purity_truth"] = final_event["queue_purity_truth"]
    predicted = top.indices[:, 0]
    training_summary = tracker.summary("total")
    metrics = {
        **scores,
        "pseudo_label_acc": accuracy(predicted, hidden),
        "train_pseudo_label_acc": training_summary["pseudo_label_acc"],
        "pseudo_label_quality": quality,
        "steps": config.iterations,
        "seconds_per_iteration": seconds_per_iteration,
    }
    if model.name == "fixmatch":
        metrics["fixmatch_mask_rate"] = training_summary["used_rate"]
    emit("eval", config.iterations, **final_event)

    write_json(out_dir / TRAINING_FILE, {
        "config": config.to_dict(),
        "method": config.method,
        "seed": config.seed,
        "device": device_name(next(backbone.parameters()).device),  # config's may be "auto"
        "budget": (metadata or {}).get("budget"),
        "architecture": architecture_of(backbone),
        "class_to_idx": {name: i for i, name in enumerate(data.class_names)},
        "pretrained_cfg": preprocessing.pretrained_cfg(data.num_classes),
        "input_white_level": preprocessing.white_level,  # null: no image of more than 8 bits
        "data": {
            "fingerprint": data.fingerprint(),
            **data.counts(),
            "hidden_label_count": int((hidden >= 0).sum()),
        },
        "metadata": metadata or {},
        "versions": package_versions(),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "metrics": metrics,
    })
    return metrics


def _decode(data: RunData, preprocessing: Preprocessing, cache_dir: Path | None,
            should_stop: Callable[[], bool] | None = None,
            on_progress: Progress | None = None) -> RunImages:
    def paths(items: list) -> list[str]:
        return [path for path, _ in items]

    pool = len(data.labeled) + len(data.unlabeled)
    whole = pool + len(data.test)  # one count over the training pool and the test images
    labeled, unlabeled = decode_pool([paths(data.labeled), paths(data.unlabeled)], "train",
                                     preprocessing, cache_dir, should_stop,
                                     counted_on(on_progress, 0, whole))
    return RunImages(
        labeled=labeled,
        unlabeled=unlabeled,
        test=decode_all(paths(data.test), "eval", preprocessing, cache_dir, should_stop,
                        counted_on(on_progress, pool, whole)),
        image_size=preprocessing.image_size,
    )


def _set_learning_rate(optimizer: torch.optim.Optimizer, config: RunConfig, step: int) -> None:
    """Step schedule: x lr_gamma after each milestone (fractions of the run)."""
    passed = sum(step >= milestone for milestone in config.milestone_steps())
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * config.lr_gamma**passed


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def _thread_budget(device: torch.device, threads: int) -> Iterator[None]:
    """On CPU use `threads` (0: every core this process may run on); put the old setting
    back after, since it is global to the process."""
    previous = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads or max(1, len(os.sched_getaffinity(0))))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _batches(dataset: StepBatches, start: int, loaders: int, device: torch.device
             ) -> Iterator[Iterator[dict]]:
    iterator = start_batches(dataset, start, loaders, pin_memory=device.type == "cuda")
    try:
        yield iterator
    finally:
        # Stops the worker processes now: the caller still holds the iterator through the
        # export and the final predictions, and garbage collection would wait for that.
        shutdown = getattr(iterator, "_shutdown_workers", None)  # multi-process loaders only
        if shutdown is not None:
            shutdown()
