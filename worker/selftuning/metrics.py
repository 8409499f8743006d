"""Scores of a run: accuracy, confusion, pseudo-label quality and queue purity."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from worker.selftuning.augment import Normalize
from worker.selftuning.methods import StepOutput

CONFIDENCE_BINS = 10
HISTOGRAM_BINS = 20
KEEP_THRESHOLD = 0.95


@torch.no_grad()
def predict(
    model: nn.Module,
    pixels: np.ndarray,
    normalize: Normalize,
    device: torch.device,
    *,
    batch_size: int = 128,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """Class probabilities [N, C] (float32, on the CPU) of a [N, H, W, 3] uint8 array, in fp32
    and eval mode; the input is laid out as timm's own eval transform would give it."""
    was_training = model.training
    model.eval()
    outputs = []
    try:
        for start in range(0, len(pixels), batch_size):
            chunk = torch.from_numpy(np.array(pixels[start : start + batch_size]))
            images = normalize(chunk.to(device).permute(0, 3, 1, 2))
            logits = model(images.contiguous(memory_format=memory_format))
            outputs.append(logits.float().softmax(dim=1).cpu())
    finally:
        model.train(was_training)
    if not outputs:
        return torch.empty(0, 0)
    return torch.cat(outputs)


def classification_metrics(
    predicted: torch.Tensor, truth: torch.Tensor, num_classes: int
) -> dict:
    """Top-1, mean per-class accuracy, per-class accuracy (None where a class has no
    images) and the confusion matrix (rows = true class, columns = predicted)."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    if len(truth):
        confusion.index_put_((truth, predicted), torch.ones_like(truth), accumulate=True)
    support = confusion.sum(dim=1)
    correct = confusion.diagonal()
    per_class = [
        int(correct[c]) / int(support[c]) if support[c] > 0 else None
        for c in range(num_classes)
    ]
    present = [acc for acc in per_class if acc is not None]
    return {
        "test_top1": int(correct.sum()) / max(1, len(truth)),
        "test_mean_class_acc": float(np.mean(present)) if present else None,
        "per_class_acc": per_class,
        "confusion_matrix": confusion.tolist(),
    }


def accuracy(predicted: torch.Tensor, truth: torch.Tensor) -> float | None:
    """Share right among the images whose truth is known (truth >= 0); None if none is."""
    known = truth >= 0
    if not bool(known.any()):
        return None
    return int((predicted[known] == truth[known]).sum()) / int(known.sum())


class TopClasses(NamedTuple):
    """Each image's most probable classes, best first: their probabilities and their
    indices, [images, k]. All that the predictions and their quality read: every image's
    probability for every class took images x classes x 4 bytes, twice while put together
    (100,000 unlabeled images of 1,000 classes: 381 MiB, and 1.1 GiB more at the peak)."""

    values: torch.Tensor
    indices: torch.Tensor


def top_classes(probabilities: torch.Tensor, k: int = 2) -> TopClasses:
    values, indices = probabilities.topk(min(k, probabilities.shape[1]), dim=1)
    return TopClasses(values, indices)


def pseudo_label_quality(
    top: TopClasses,
    hidden: torch.Tensor,
    labeled_targets: torch.Tensor,
    num_classes: int,
) -> dict:
    """How trustworthy the final model's labels for the unlabeled images are.

    With hidden labels: accuracy by confidence, what a 0.95 threshold would keep and how
    right that is, per-class precision and recall. Without: the confidence histogram and
    the predicted against the labeled class distribution.
    """
    confidence, predicted = top.values[:, 0], top.indices[:, 0]
    known = hidden >= 0
    correct = predicted == hidden
    bins = []
    edges = np.linspace(0.0, 1.0, CONFIDENCE_BINS + 1)
    for i, (low, high) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        upper = confidence <= high if i == CONFIDENCE_BINS - 1 else confidence < high
        inside = (confidence >= low) & upper
        judged = inside & known
        bins.append({
            "lo": round(float(low), 4),
            "hi": round(float(high), 4),
            "count": int(inside.sum()),
            "judged": int(judged.sum()),  # of those, with a withheld label: what accuracy is of
            "accuracy": _share(correct[judged]),
        })
    kept = confidence >= KEEP_THRESHOLD
    kept_known = kept & known
    histogram_edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
    histogram, _ = np.histogram(confidence.numpy(), bins=histogram_edges)
    quality = {
        "confidence_bins": bins,
        "kept_share_at_095": _share(kept),
        "kept_accuracy_at_095": _share(correct[kept_known]),
        "kept_judged_at_095": int(kept_known.sum()),  # what that accuracy is of
        "predicted_distribution": _distribution(predicted, num_classes),
        "labeled_distribution": _distribution(labeled_targets, num_classes),
        "confidence_histogram": {
            "edges": [round(float(e), 4) for e in histogram_edges],
            "counts": [int(c) for c in histogram],
        },
    }
    if known.any():
        truth, guess = hidden[known], predicted[known]
        precision, recall = [], []
        for c in range(num_classes):
            hits = int(((guess == c) & (truth == c)).sum())
            predicted_c, actual_c = int((guess == c).sum()), int((truth == c).sum())
            precision.append(hits / predicted_c if predicted_c else None)
            recall.append(hits / actual_c if actual_c else None)
        quality["per_class_precision"] = precision
        quality["per_class_recall"] = recall
    return quality


def queue_purity(
    classes: torch.Tensor, predicted: torch.Tensor, truth: torch.Tensor, pseudo: torch.Tensor
) -> tuple[float | None, float | None]:
    """(share of queued keys whose class is the model's current prediction for their image,
    share of the pseudo-labeled keys (`pseudo`: queued by an unlabeled image) whose class is
    the image's withheld label, among those with one). Labeled keys are right by
    construction, so they are left out of the second: it says how clean the pseudo-labels in
    the queue are, None where none can be checked."""
    if len(classes) == 0:
        return None, None
    checked = pseudo & (truth >= 0)
    return _share(classes == predicted), _share(classes[checked] == truth[checked])


def _share(flags: torch.Tensor) -> float | None:
    """Share of True in a bool tensor; None when it is empty."""
    return int(flags.sum()) / len(flags) if len(flags) else None


def _distribution(labels: torch.Tensor, num_classes: int) -> list[float] | None:
    """The share of each class among `labels`; None without labels (no images to share out,
    which zeros would misreport as none of any class)."""
    counts = torch.bincount(labels.long(), minlength=num_classes).tolist()
    total = sum(counts)
    return [c / total for c in counts] if total else None


class PseudoLabelTracker:
    """Counts how right the pseudo-labels used in training were, since the last evaluation
    (`window`) and over the whole run (`total`); part of the training state. Counts stay on
    the device until read, so tracking does not make the GPU wait every iteration."""

    FIELDS = ("seen", "used", "used_known", "used_correct", "known", "correct")

    def __init__(self) -> None:
        self.window = dict.fromkeys(self.FIELDS, 0)
        self.total = dict.fromkeys(self.FIELDS, 0)
        self._pending: torch.Tensor | None = None

    def update(self, output: StepOutput, hidden: torch.Tensor) -> None:
        if output.pseudo_labels is None or len(output.pseudo_labels) == 0:
            return
        labels, used = output.pseudo_labels, output.pseudo_used
        known = hidden >= 0
        correct = (labels == hidden) & known
        counts = torch.stack([
            torch.ones_like(labels).sum(),
            used.sum(),
            (used & known).sum(),
            (used & correct).sum(),
            known.sum(),
            correct.sum(),
        ])
        self._pending = counts if self._pending is None else self._pending + counts

    def _flush(self) -> None:
        if self._pending is None:
            return
        for name, value in zip(self.FIELDS, self._pending.tolist(), strict=True):
            self.window[name] += int(value)
            self.total[name] += int(value)
        self._pending = None

    def summary(self, which: str = "total") -> dict[str, float | None]:
        self._flush()
        counts = self.total if which == "total" else self.window

        def ratio(a: str, b: str) -> float | None:
            return counts[a] / counts[b] if counts[b] else None

        return {
            "pseudo_label_acc": ratio("used_correct", "used_known"),
            "all_pseudo_label_acc": ratio("correct", "known"),
            "used_rate": ratio("used", "seen"),
        }

    def take_window(self) -> dict[str, float | None]:
        summary = self.summary("window")
        self.window = dict.fromkeys(self.FIELDS, 0)
        return summary

    def state_dict(self) -> dict:
        self._flush()
        return {"window": dict(self.window), "total": dict(self.total)}

    def load_state_dict(self, state: dict) -> None:
        self._pending = None
        self.window = {name: int(state["window"][name]) for name in self.FIELDS}
        self.total = {name: int(state["total"][name]) for name in self.FIELDS}
