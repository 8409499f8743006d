"""Training runs end to end: events, outputs, cancel, exact resume and the exported model."""

from __future__ import annotations

import csv
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.data import create_transform, resolve_data_config

from tests.engine.helpers import predicted_classes, tiny_config
from worker.selftuning import METHODS, RunData, TrainingCancelled, loop, open_rgb, train
from worker.selftuning.batches import MOST_AUTO_LOADERS, loader_processes
from worker.selftuning.checkpoint import load_checkpoint, save_checkpoint
from worker.selftuning.config import AUTO_LOADERS
from worker.selftuning.metrics import pseudo_label_quality, queue_purity, top_classes


class Recorder:
    def __init__(self, stop_at: int | None = None):
        self.events: list[dict] = []
        self.stop_at = stop_at

    def __call__(self, event: dict) -> None:
        json.dumps(event, allow_nan=False)  # every event must be JSON-safe as it is
        self.events.append(event)

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["type"] == kind]

    def has_started(self) -> bool:
        """A cancel flag raised once the images are decoded: the run stops before its first
        step with a state saved (a cancel while decoding keeps nothing)."""
        return bool(self.of("started"))

    def should_cancel(self) -> bool:
        progress = self.of("progress")
        return self.stop_at is not None and bool(progress) and progress[-1]["step"] >= self.stop_at


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, shapes_data: RunData):
    out = tmp_path_factory.mktemp("run")
    recorder = Recorder()
    metrics = train(tiny_config(), shapes_data, out, on_event=recorder,
                    metadata={"budget": {"per_class": 4}, "note": "test"})
    return out, recorder, metrics


def test_events_follow_the_contract(finished_run):
    _, recorder, metrics = finished_run
    # (`stage` events come only from work that takes seconds: none on this tiny dataset.)
    assert recorder.events[0] == {"type": "started", "step": 0, "total_steps": 6,
                                  "resumed_from_step": None, "loader_processes": 0}
    assert all(e["total_steps"] == 6 for e in recorder.events)
    progress = recorder.of("progress")
    assert [e["step"] for e in progress] == [2, 4, 6]
    assert set(progress[0]["losses"]) == {"ce", "pgc_labeled", "pgc_unlabeled"}
    assert progress[0]["lr"] > 0 and progress[0]["images_per_s"] > 0
    evals = recorder.of("eval")
    assert [e["step"] for e in evals] == [3, 6]
    for event in evals:
        for key in ("test_top1", "test_mean_class_acc", "pseudo_label_acc", "queue_purity"):
            assert 0 <= event[key] <= 1
    assert evals[-1]["test_top1"] == metrics["test_top1"]
    assert [e["step"] for e in recorder.of("checkpoint")] == [3, 6]


def test_work_outside_the_steps_says_how_far_it_is(tmp_path: Path, shapes_data: RunData,
                                                   monkeypatch):
    """Decoding a large dataset before the first step, and decoding and labeling its
    unlabeled images after the last, took minutes (over 10 for 60,000 images on a CPU)
    without a word: the run page's time left said 0 s throughout. `stage` events say how far
    each is; a stage shorter than STAGE_EVERY_S says nothing (0 here: every report)."""
    monkeypatch.setattr(loop, "STAGE_EVERY_S", 0.0)
    recorder = Recorder()
    train(tiny_config(), shapes_data, tmp_path / "out", on_event=recorder,
          cache_dir=tmp_path / "cache")
    kinds = [event["type"] for event in recorder.events]
    stages = recorder.of("stage")
    decoding = [e for e in stages if e["stage"] == "decoding"]
    labeling = [e for e in stages if e["stage"] == "labeling"]
    assert decoding and labeling and len(stages) == len(decoding) + len(labeling)
    # Set-up's, at step 0 before training starts: one count over the training pool and
    # then the test images (the test images' own count began again at 0).
    assert kinds.index("started") > kinds.index("stage") and decoding[0]["step"] == 0
    whole = len(shapes_data.labeled) + len(shapes_data.unlabeled) + len(shapes_data.test)
    setup = [e for e in decoding if e["step"] == 0]
    assert all(e["total"] == whole for e in setup) and setup[-1]["done"] == whole
    assert [e["done"] for e in setup] == sorted(e["done"] for e in setup)
    assert all(0 < e["done"] <= e["total"] for e in stages)
    # After the last step: the pool's eval crops (into the cache), then labeling the
    # unlabeled images, before the final evaluation.
    after = [e for e in stages if e["step"] == 6]
    assert after[-1] == {"type": "stage", "step": 6, "total_steps": 6, "stage": "labeling",
                         "done": len(shapes_data.unlabeled),
                         "total": len(shapes_data.unlabeled)}
    last_step = max(index for index, kind in enumerate(kinds) if kind == "progress")
    assert kinds[last_step + 1:] == ["checkpoint", *["stage"] * len(after), "eval"]


def test_outputs_of_a_run(finished_run, shapes_data: RunData):
    out, _, metrics = finished_run
    assert {p.name for p in out.iterdir()} >= {
        "model.safetensors", "config.json", "training.json", "predictions.csv",
        "test_predictions.json", "state",
    }
    # Every export has the mode of any new file there (safetensors alone would make the model
    # private, and so the copy a user unzips from the checkpoint download).
    modes = {name: (out / name).stat().st_mode & 0o777 for name in (
        "model.safetensors", "config.json", "training.json", "predictions.csv")}
    assert len(set(modes.values())) == 1, modes
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "test_efficientnet"
    assert config["num_classes"] == 3 and config["label_names"] == shapes_data.class_names
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert set(config["pretrained_cfg"]) >= {"mean", "std", "interpolation", "crop_pct"}

    training = json.loads((out / "training.json").read_text())
    assert training["config"]["method"] == "self-tuning"
    assert training["class_to_idx"] == {"circle": 0, "square": 1, "triangle": 2}
    assert training["metadata"]["note"] == "test" and training["budget"] == {"per_class": 4}
    assert set(training["versions"]) >= {"torch", "timm"}
    assert training["device"] == "cpu"  # what it ran on (its config may say "auto")
    assert training["metrics"] == json.loads(json.dumps(metrics))
    assert len(metrics["confusion_matrix"]) == 3
    assert sum(map(sum, metrics["confusion_matrix"])) == len(shapes_data.test)
    # The matrix reads as rows, a line a class (indent=2 gave each count its own line).
    rows = [f"      {json.dumps(row)}" for row in metrics["confusion_matrix"]]
    assert "\n".join(f"{row}," for row in rows)[:-1] in (out / "training.json").read_text()
    assert len(metrics["per_class_acc"]) == 3
    assert 0 <= metrics["pseudo_label_acc"] <= 1 and 0 <= metrics["train_pseudo_label_acc"] <= 1
    quality = metrics["pseudo_label_quality"]
    assert sum(b["count"] for b in quality["confidence_bins"]) == len(shapes_data.unlabeled)
    assert sum(b["judged"] for b in quality["confidence_bins"]) == sum(
        label is not None for _, label in shapes_data.unlabeled)  # what the accuracy is of
    assert set(quality) >= {"kept_share_at_095", "kept_accuracy_at_095", "kept_judged_at_095",
                            "queue_purity",
                            "queue_purity_truth", "predicted_distribution",
                            "labeled_distribution", "confidence_histogram"}

    with (out / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["path", "label", "confidence", "margin", "hidden_label"]
    assert [r["path"] for r in rows] == [p for p, _ in shapes_data.unlabeled]
    assert all(r["label"] in shapes_data.class_names for r in rows)
    assert {r["hidden_label"] for r in rows} >= {""}  # the truly unlabeled images
    test_predictions = json.loads((out / "test_predictions.json").read_text())
    # Each test image by its path, with its class and the model's answer by name.
    assert [(row["path"], row["label"]) for row in test_predictions] == [
        (path, shapes_data.class_names[label]) for path, label in shapes_data.test]
    assert {row["predicted"] for row in test_predictions} <= set(shapes_data.class_names)


def test_exported_model_loads_in_plain_timm_with_identical_predictions(finished_run,
                                                                       shapes_data: RunData):
    out, _, _ = finished_run
    config = json.loads((out / "config.json").read_text())
    classes = config["num_classes"]
    # timm drops a checkpoint's classifier unless the overlay says how many classes it has.
    model = timm.create_model(
        config["architecture"], pretrained=True, num_classes=classes,
        pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=classes),
    ).eval()
    exported = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in exported.items())
    transform = create_transform(**resolve_data_config(pretrained_cfg=config["pretrained_cfg"]))
    with torch.no_grad():
        images = torch.stack([transform(open_rgb(path)) for path, _ in shapes_data.test])
        predicted = model(images).argmax(dim=1).tolist()
    assert predicted == predicted_classes(out, shapes_data)

    hub_layout = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        assert hub_layout(images).argmax(dim=1).tolist() == predicted

    # predictions.csv holds what plain timm says of the unlabeled images too.
    with torch.no_grad():
        unlabeled = torch.stack([transform(open_rgb(path)) for path, _ in shapes_data.unlabeled])
        confidence, label = model(unlabeled).softmax(dim=1).max(dim=1)
    with (out / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["label"] for row in rows] == [config["label_names"][i] for i in label.tolist()]
    written = torch.tensor([float(row["confidence"]) for row in rows])
    assert torch.allclose(written, confidence, rtol=0, atol=1e-6)  # 6 decimals are written


@pytest.mark.parametrize(("method", "terms"), [
    ("fine-tune", {"ce"}),
    ("fixmatch", {"ce", "fixmatch"}),
])
def test_baselines_train_with_their_own_loss_terms(tmp_path: Path, shapes_data: RunData,
                                                   method, terms):
    recorder = Recorder()
    metrics = train(tiny_config(method=method, iterations=4), shapes_data, tmp_path,
                    on_event=recorder)
    assert set(recorder.of("progress")[0]["losses"]) == terms
    final = recorder.of("eval")[-1]
    assert "queue_purity" not in final
    if method == "fixmatch":
        assert "mask_rate" in recorder.of("progress")[0]
        assert 0 <= final["fixmatch_mask_rate"] <= 1
        assert 0 <= metrics["fixmatch_mask_rate"] <= 1
    else:
        assert final["pseudo_label_acc"] is None and metrics["train_pseudo_label_acc"] is None
    assert metrics["pseudo_label_acc"] is not None  # the final model on hidden labels


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_without_unlabeled_images(tmp_path: Path, shapes_data: RunData,
                                                      method):
    """`unlabeled_batch_size: 0` (the README's ablation, open to users): no unlabeled term is
    reported (a chart drew them flat at 0) and nothing enters the queue but labeled keys."""
    recorder = Recorder()
    metrics = train(tiny_config(method=method, unlabeled_batch_size=0, iterations=4),
                    shapes_data, tmp_path, on_event=recorder)
    progress = recorder.of("progress")[-1]
    losses = progress["losses"]
    assert set(losses) == ({"ce", "pgc_labeled"} if method == "self-tuning" else {"ce"})
    assert "mask_rate" not in progress
    assert all(np.isfinite(value) for value in losses.values())
    assert 0 <= metrics["test_top1"] <= 1
    if method == "self-tuning":
        # Only labeled keys in the queue: no pseudo-label there to check.
        assert recorder.of("eval")[-1]["queue_purity_truth"] is None


def test_self_tuning_labeled_query_view_is_the_configured_one(tmp_path: Path, shapes_data,
                                                              monkeypatch):
    """With `labeled_query_view` weak, Self-Tuning's classifier trains on exactly the labeled
    views fine-tuning trains on (same seed, same step); with strong, on other ones."""
    first_views: dict[tuple[str, str], torch.Tensor] = {}

    def recording(method_class):
        original = method_class.training_step

        def training_step(self, batch):
            first_views.setdefault((self.name, self.config.labeled_query_view),
                                   batch.labeled[0].clone())
            return original(self, batch)

        monkeypatch.setattr(method_class, "training_step", training_step)

    recording(METHODS["fine-tune"])
    recording(METHODS["self-tuning"])
    for method, view in [("fine-tune", "weak"), ("self-tuning", "weak"),
                         ("self-tuning", "strong")]:
        config = tiny_config(method=method, labeled_query_view=view, iterations=1)
        train(config, shapes_data, tmp_path / f"{method}-{view}")
    fine_tune = first_views["fine-tune", "weak"]
    assert torch.equal(first_views["self-tuning", "weak"], fine_tune)
    assert not torch.equal(first_views["self-tuning", "strong"], fine_tune)


def _checkpoint_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(out / "state" / "checkpoint.pt")["model"]


def cancel_at(step: int, config, data, out: Path) -> None:
    """Train with a cancel raised once `step` is trained: the run stops there, its training
    state saved at that step and no model exported."""
    recorder = Recorder(stop_at=step)
    with pytest.raises(TrainingCancelled) as cancelled:
        train(config, data, out, on_event=recorder, should_cancel=recorder.should_cancel)
    assert cancelled.value.step == step
    assert recorder.of("checkpoint")[-1]["step"] == step
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize("method", ["self-tuning", "fixmatch"])
def test_resume_after_cancel_gives_bitwise_the_same_weights(tmp_path: Path, shapes_data,
                                                            method):
    config = tiny_config(method=method, iterations=6, checkpoint_interval=100, log_interval=1)
    train(config, shapes_data, tmp_path / "straight")

    cancel_at(3, config, shapes_data, tmp_path / "resumed")
    resumed = Recorder()
    train(config, shapes_data, tmp_path / "resumed", on_event=resumed)
    assert resumed.events[0]["resumed_from_step"] == 3
    assert resumed.of("progress")[0]["step"] == 4

    straight_state = _checkpoint_tensors(tmp_path / "straight")
    resumed_state = _checkpoint_tensors(tmp_path / "resumed")
    assert straight_state.keys() == resumed_state.keys()
    for key, value in straight_state.items():  # query and key encoders, queue, pointers
        assert torch.equal(value, resumed_state[key]), key
    straight = load_file(str(tmp_path / "straight" / "model.safetensors"))
    again = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert all(torch.equal(straight[k], again[k]) for k in straight)


def test_a_cancel_during_the_last_step_stops_before_the_export(tmp_path: Path, shapes_data):
    """The flag was looked at before each step only: a cancel that came during the last one
    was never seen, and the run scored, exported its model and ended succeeded."""
    config = tiny_config(iterations=3, log_interval=1)
    cancel_at(3, config, shapes_data, tmp_path / "run")
    resumed = Recorder()  # run again: nothing left to train, it scores and exports
    train(config, shapes_data, tmp_path / "run", on_event=resumed)
    assert resumed.events[0]["resumed_from_step"] == 3 and resumed.of("progress") == []
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_resume_after_a_crash_continues_from_the_last_checkpoint(tmp_path: Path, shapes_data):
    config = tiny_config(iterations=4, checkpoint_interval=2, log_interval=1, num_workers=1)

    def crash(event: dict) -> None:
        if event["type"] == "progress" and event["step"] == 3:
            raise RuntimeError("worker died")

    with pytest.raises(RuntimeError, match="worker died"):
        train(config, shapes_data, tmp_path / "crashed", on_event=crash)
    assert load_checkpoint(tmp_path / "crashed" / "state" / "checkpoint.pt")["step"] == 2
    train(config, shapes_data, tmp_path / "crashed")
    train(config.replace(num_workers=0), shapes_data, tmp_path / "straight")
    straight = load_file(str(tmp_path / "straight" / "model.safetensors"))
    again = load_file(str(tmp_path / "crashed" / "model.safetensors"))
    assert all(torch.equal(straight[k], again[k]) for k in straight)


def test_loader_processes_stop_before_the_export(tmp_path: Path, shapes_data, monkeypatch):
    """The export predicts every unlabeled image; the data loader's processes (memory, and
    on a GPU host pinned buffers) must be gone by then, not at garbage collection."""
    import multiprocessing

    import worker.selftuning.loop as loop

    alive_at_export = []
    finish = loop._finish

    def spy(*args, **kwargs):
        alive_at_export.extend(multiprocessing.active_children())
        return finish(*args, **kwargs)

    monkeypatch.setattr(loop, "_finish", spy)
    train(tiny_config(iterations=2, num_workers=2), shapes_data, tmp_path)
    assert alive_at_export == []


@pytest.mark.parametrize(
    ("requested", "device", "cores", "chosen"),
    [
        (3, "cuda", 16, 3),  # a number is kept, on any device
        (0, "cuda:1", 16, 0),
        (2, "cpu", 16, 2),
        (AUTO_LOADERS, "cpu", 16, 0),  # a CPU's cores train
        (AUTO_LOADERS, "cuda", 16, 15),  # a GPU's: every core but the training process's
        (AUTO_LOADERS, "cuda:0", 2, 1),
        (AUTO_LOADERS, "cuda", 1, 1),
        (AUTO_LOADERS, "cuda", 128, MOST_AUTO_LOADERS),
    ],
)
def test_the_presets_choose_the_loader_processes_for_the_device(requested, device, cores,
                                                                 chosen):
    assert loader_processes(requested, torch.device(device), cores) == chosen


def test_a_cpu_run_of_a_preset_builds_its_batches_in_the_training_process(
    tmp_path: Path, shapes_data, monkeypatch
):
    """The presets' -1 on a CPU: no loader processes, and the run says how many it used."""
    import multiprocessing

    import worker.selftuning.loop as loop

    alive = []
    step = loop.to_device_batch

    def spy(*args, **kwargs):
        alive.append(len(multiprocessing.active_children()))
        return step(*args, **kwargs)

    monkeypatch.setattr(loop, "to_device_batch", spy)
    recorder = Recorder()
    config = tiny_config(iterations=2, num_workers=AUTO_LOADERS, device="cpu")
    train(config, shapes_data, tmp_path, on_event=recorder)
    assert recorder.of("started")[0]["loader_processes"] == 0
    assert alive == [0, 0]


def _train_as_a_celery_task(config, data, out: Path, children) -> None:
    """The body of a daemonic process, as Celery's prefork pool runs a task: counts the
    processes alive under it while it trains."""
    import multiprocessing

    def count(event: dict) -> None:
        if event["type"] == "progress":
            children.put(len(multiprocessing.active_children()))

    train(config, data, out, on_event=count)


def test_a_daemonic_process_like_a_celery_task_builds_batches_in_loader_processes(
    tmp_path: Path, shapes_data
):
    """Celery runs each task in a daemonic process, where multiprocessing refuses children:
    the loader's processes used to be dropped there (every batch built on one core). They
    start now, and the weights equal those of batches built in the training process."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    children = context.Queue()
    config = tiny_config(iterations=4, log_interval=1, num_workers=2)
    task = context.Process(target=_train_as_a_celery_task, daemon=True,
                           args=(config, shapes_data, tmp_path / "task", children))
    task.start()
    task.join(timeout=120)
    assert task.exitcode == 0
    counts = [children.get(timeout=5) for _ in range(4)]
    assert counts == [2, 2, 2, 2]

    train(config.replace(num_workers=0), shapes_data, tmp_path / "alone")
    in_task = load_file(str(tmp_path / "task" / "model.safetensors"))
    alone = load_file(str(tmp_path / "alone" / "model.safetensors"))
    assert all(torch.equal(in_task[k], alone[k]) for k in alone)


def test_training_time_counts_across_resumes_and_survives_a_re_export(tmp_path: Path,
                                                                      shapes_data):
    """seconds_per_iteration covers the whole run: a resumed run adds to its checkpoint's
    time, and running a finished run again (the export is rewritten, nothing is trained)
    keeps the figure instead of writing null."""
    config = tiny_config(iterations=4, checkpoint_interval=2, log_interval=1)

    def crash(event: dict) -> None:
        if event["type"] == "progress" and event["step"] == 3:
            raise RuntimeError("worker died")

    with pytest.raises(RuntimeError):
        train(config, shapes_data, tmp_path, on_event=crash)
    timing = load_checkpoint(tmp_path / "state" / "checkpoint.pt")["timing"]
    assert timing["iterations"] == 2 and timing["seconds"] > 0

    def seconds_per_iteration() -> float:
        return json.loads((tmp_path / "training.json").read_text())["metrics"][
            "seconds_per_iteration"]

    train(config, shapes_data, tmp_path)
    resumed = load_checkpoint(tmp_path / "state" / "checkpoint.pt")["timing"]
    assert resumed["iterations"] == 4 and resumed["seconds"] > timing["seconds"]
    assert seconds_per_iteration() == resumed["seconds"] / 4
    train(config, shapes_data, tmp_path)
    assert seconds_per_iteration() == resumed["seconds"] / 4


def test_cancel_before_the_first_step_saves_a_resumable_state(tmp_path: Path, shapes_data):
    events = Recorder()
    with pytest.raises(TrainingCancelled):
        train(tiny_config(), shapes_data, tmp_path, on_event=events,
              should_cancel=events.has_started)
    assert events.of("checkpoint") == [{"type": "checkpoint", "step": 0, "total_steps": 6,
                                        "path": str(tmp_path / "state" / "checkpoint.pt")}]


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path: Path, shapes_data):
    with pytest.raises(TrainingCancelled):
        train(tiny_config(), shapes_data, tmp_path, on_event=(started := Recorder()),
              should_cancel=started.has_started)
    with pytest.raises(ValueError, match="other settings \\(lr\\)"):
        train(tiny_config(lr=0.02), shapes_data, tmp_path)


@pytest.mark.parametrize(("view", "resumes"), [("strong", True), ("weak", False)])
def test_a_checkpoint_from_before_labeled_query_view_resumes_on_the_strong_view(
    tmp_path: Path, shapes_data, view, resumes
):
    """An older release saved no `labeled_query_view` (it trained on the strong view, and
    migration 0002 records "strong" for its runs): every resume of such a run failed on
    "other settings (labeled_query_view)", whatever was tried."""
    stopping = Recorder(stop_at=3)
    with pytest.raises(TrainingCancelled):
        train(tiny_config(labeled_query_view="strong", checkpoint_interval=100), shapes_data,
              tmp_path, on_event=stopping, should_cancel=stopping.should_cancel)
    path = tmp_path / "state" / "checkpoint.pt"
    state = load_checkpoint(path)
    del state["config"]["labeled_query_view"]
    save_checkpoint(path, state)
    if resumes:
        resumed = Recorder()
        train(tiny_config(labeled_query_view=view, checkpoint_interval=100), shapes_data,
              tmp_path, on_event=resumed)
        assert resumed.events[0]["resumed_from_step"] == state["step"] > 0
    else:
        with pytest.raises(ValueError, match="other settings \\(labeled_query_view\\)"):
            train(tiny_config(labeled_query_view=view, checkpoint_interval=100), shapes_data,
                  tmp_path)


def _moved(data: RunData, old_root: Path, new_root: Path) -> RunData:
    def move(items):
        return [(str(new_root / Path(path).relative_to(old_root)), label) for path, label in items]
    return RunData(class_names=data.class_names, labeled=move(data.labeled),
                   unlabeled=move(data.unlabeled), test=move(data.test))


def test_resume_follows_images_whose_folder_moved(tmp_path: Path, shapes_root: Path,
                                                  shapes_data):
    """A data directory mounted elsewhere after a stop: same images, new paths."""
    with pytest.raises(TrainingCancelled):
        train(tiny_config(), shapes_data, tmp_path / "run", on_event=(started := Recorder()),
              should_cancel=started.has_started)
    moved_root = tmp_path / "mounted-elsewhere"
    shutil.copytree(shapes_root, moved_root)
    moved = _moved(shapes_data, shapes_root, moved_root)
    assert moved.fingerprint() == shapes_data.fingerprint()
    resumed = Recorder()
    train(tiny_config(), moved, tmp_path / "run", on_event=resumed)
    assert resumed.events[0]["resumed_from_step"] == 0

    relabeled = RunData(class_names=moved.class_names, labeled=moved.labeled[1:],
                        unlabeled=moved.unlabeled, test=moved.test)
    with pytest.raises(TrainingCancelled):
        train(tiny_config(), shapes_data, tmp_path / "other", on_event=(started := Recorder()),
              should_cancel=started.has_started)
    counts = shapes_data.counts()
    with pytest.raises(ValueError, match=re.escape(
            f"other images or labels (then {counts['labeled_count']} labeled, "
            f"{counts['unlabeled_count']} unlabeled and {counts['test_count']} test images; now "
            f"{counts['labeled_count'] - 1}, {counts['unlabeled_count']} and "
            f"{counts['test_count']}); use a new output folder")):
        train(tiny_config(), relabeled, tmp_path / "other")


def test_resume_accepts_a_checkpoint_fingerprinted_with_full_paths(tmp_path: Path,
                                                                  shapes_data):
    """Checkpoints written before the fingerprint dropped the shared folder still resume."""
    with pytest.raises(TrainingCancelled):
        train(tiny_config(), shapes_data, tmp_path, on_event=(started := Recorder()),
              should_cancel=started.has_started)
    state_file = tmp_path / "state" / "checkpoint.pt"
    state = load_checkpoint(state_file)
    state["data_fingerprint"] = shapes_data.fingerprint_with_full_paths()
    assert state["data_fingerprint"] != shapes_data.fingerprint()
    save_checkpoint(state_file, state)
    resumed = Recorder()
    train(tiny_config(), shapes_data, tmp_path, on_event=resumed)
    assert resumed.events[0]["resumed_from_step"] == 0


def test_each_image_is_decoded_once_for_training_and_the_unlabeled_again_for_predictions(
    tmp_path: Path, shapes_data, monkeypatch
):
    """Training reads the decoded cache, never the files, however many times it cycles through
    them; the final predictions read each unlabeled file once more, as plain timm would."""
    import worker.selftuning.images as images

    decoded = []
    original = images.open_rgb

    def counting(path, *args, **kwargs):
        decoded.append(path)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(images, "open_rgb", counting)
    # 20 iterations of 4 labeled images cycle through the 12 labeled ones several times.
    train(tiny_config(iterations=20, eval_interval=100, checkpoint_interval=100), shapes_data,
          tmp_path)
    everything = shapes_data.labeled + 2 * shapes_data.unlabeled + shapes_data.test
    assert sorted(decoded) == sorted(path for path, _ in everything)

    # With a cache folder, a second run on the same images decodes none of them. The first
    # keeps eval crops of the whole training pool (labeled images too), for runs whose
    # budget leaves other images unlabeled.
    decoded.clear()
    for out in ("cached-1", "cached-2"):
        train(tiny_config(iterations=2, eval_interval=100, checkpoint_interval=100), shapes_data,
              tmp_path / out, cache_dir=tmp_path / "cache")
        if out == "cached-1":
            assert sorted(decoded) == sorted(
                path for path, _ in everything + shapes_data.labeled)
            decoded.clear()
    assert decoded == []


def test_queue_purity_against_the_truth_checks_pseudo_labeled_keys_only():
    classes = torch.tensor([0, 1, 0, 1, 2])
    predicted = torch.tensor([0, 1, 1, 1, 2])
    truth = torch.tensor([0, 1, -1, 0, 2])  # -1: no withheld label
    pseudo = torch.tensor([False, True, True, True, False])  # the others are labeled keys
    assert queue_purity(classes, predicted, truth, pseudo) == (0.8, 0.5)
    # Only labeled keys (a budget of "all"): nothing to check, not 100 %.
    assert queue_purity(classes, predicted, truth, torch.zeros(5, dtype=torch.bool))[1] is None


def test_data_without_hidden_labels_reports_nulls(tmp_path: Path, shapes_data):
    data = RunData(class_names=shapes_data.class_names, labeled=shapes_data.labeled,
                   unlabeled=[(p, None) for p, _ in shapes_data.unlabeled],
                   test=shapes_data.test)
    metrics = train(tiny_config(iterations=2), data, tmp_path)
    assert metrics["pseudo_label_acc"] is None and metrics["train_pseudo_label_acc"] is None
    quality = metrics["pseudo_label_quality"]
    assert all(b["accuracy"] is None for b in quality["confidence_bins"])
    assert quality["queue_purity_truth"] is None  # no withheld label to check a key against
    assert np.isclose(sum(quality["predicted_distribution"]), 1.0)


def test_quality_without_unlabeled_images_has_no_predicted_distribution():
    """It was [0, 0, 0]: read as "no image of any class" rather than "no images"."""
    quality = pseudo_label_quality(top_classes(torch.empty(0, 3)),
                                   torch.empty(0, dtype=torch.long),
                                   torch.tensor([0, 1, 2, 2]), num_classes=3)
    assert quality["predicted_distribution"] is None
    assert quality["labeled_distribution"] == [0.25, 0.25, 0.5]
    assert quality["kept_share_at_095"] is None


def test_what_a_095_threshold_keeps_is_scored_on_those_kept_with_a_withheld_label():
    """The run page said "accuracy of what it keeps 20.0%" without of how many: 2 of 10 kept
    images with a withheld label, the others having none."""
    probabilities = torch.tensor([[0.97, 0.02, 0.01], [0.96, 0.03, 0.01], [0.99, 0.005, 0.005],
                                  [0.5, 0.3, 0.2], [0.01, 0.98, 0.01]])
    hidden = torch.tensor([0, 1, -1, 0, -1])  # -1: no withheld label
    quality = pseudo_label_quality(top_classes(probabilities), hidden, torch.tensor([0, 1, 2]),
                                   num_classes=3)
    assert quality["kept_share_at_095"] == 0.8
    assert quality["kept_judged_at_095"] == 2  # images 0 and 1: one right, one wrong
    assert quality["kept_accuracy_at_095"] == 0.5


def test_a_cancel_while_the_images_are_decoded_stops_the_decoding_and_keeps_nothing(
    tmp_path: Path, shapes_data, monkeypatch
):
    """The flag was read only between training steps: a run decoding a large pool at a large
    size (minutes, and tens of GB of cache) could not be cancelled until it was done."""
    from worker.selftuning import images

    decoded = []
    original = images._decode_one
    monkeypatch.setattr(images, "_decode_one",
                        lambda *args: decoded.append(args[0]) or original(*args))
    asked = []

    def cancelled() -> bool:
        asked.append(1)
        time.sleep(0.3)  # slow to answer, as on a busy machine: the threads go on meanwhile
        return True

    events = Recorder()
    with pytest.raises(TrainingCancelled) as stopped:
        train(tiny_config(), shapes_data, tmp_path / "run", on_event=events,
              cache_dir=tmp_path / "cache", should_cancel=cancelled)
    assert stopped.value.step == 0 and asked
    pool = len(shapes_data.labeled) + len(shapes_data.unlabeled)
    # Stopped part way: at most the images the threads had been given (two each, of 34).
    # All of them given at once, the threads had decoded the whole pool by the answer.
    assert len(decoded) <= images.DECODED_AHEAD_PER_THREAD * images.decoding_threads() < pool
    assert events.events == []  # nothing started, nothing saved
    assert not (tmp_path / "run" / "state").exists()
    assert list((tmp_path / "cache").iterdir()) == []  # its half-written cache removed
