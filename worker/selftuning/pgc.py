"""Pseudo Group Contrast: the loss and the class-wise key queue, vectorised over the batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pgc_loss(
    query: torch.Tensor,
    key: torch.Tensor,
    labels: torch.Tensor,
    queue: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Per-sample PGC loss, shape [N].

    query, key: [N, P] L2-normalised; labels: [N] (true or pseudo) classes; queue: [C, K, P],
    the keys as they were before this batch is enqueued. For each sample the candidates are
    its own key and all C*K queued keys (score q.key / temperature); the positives are its
    own key and the K keys of its class; the loss is minus the mean log-softmax over the
    K + 1 positives.
    """
    num_classes, queue_size, dim = queue.shape
    own = (query * key).sum(dim=1, keepdim=True)
    queued = query @ queue.reshape(num_classes * queue_size, dim).t()
    log_prob = torch.log_softmax(torch.cat([own, queued], dim=1) / temperature, dim=1)
    rows = torch.arange(len(labels), device=labels.device)
    class_log_prob = log_prob[:, 1:].reshape(-1, num_classes, queue_size)[rows, labels]
    return -(log_prob[:, 0] + class_log_prob.sum(dim=1)) / (queue_size + 1)


def enqueue_slots(
    labels: torch.Tensor, pointers: torch.Tensor, queue_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where a batch of keys lands in the per-class rings: (keep, classes, slots).

    Key i of class c goes to slot (pointer[c] + rank) mod K, rank being its order among the
    batch's keys of class c, exactly as writing them one by one would. When a class gets
    more than K keys, only its last K survive, so those are the only ones kept (`keep` is a
    mask over the batch); the written (class, slot) pairs are then all distinct.
    """
    num_classes = len(pointers)
    one_hot = F.one_hot(labels, num_classes)
    rank = (one_hot.cumsum(dim=0) * one_hot).sum(dim=1) - 1
    counts = one_hot.sum(dim=0)
    keep = rank >= counts[labels] - queue_size
    slots = (pointers[labels] + rank) % queue_size
    return keep, labels[keep], slots[keep]


@torch.no_grad()
def enqueue(
    queue: torch.Tensor, pointers: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Write `keys` [N, P] into the rings of their `labels` and advance the write pointers.

    Returns (keep, classes, slots) from `enqueue_slots`, so companion buffers can be
    written at the same places.
    """
    queue_size = queue.shape[1]
    keep, classes, slots = enqueue_slots(labels, pointers, queue_size)
    queue[classes, slots] = keys[keep].to(queue.dtype)
    counts = torch.bincount(labels, minlength=len(pointers))
    pointers.copy_((pointers + counts) % queue_size)
    return keep, classes, slots


@torch.no_grad()
def ema_update(
    target: list[torch.Tensor], source: list[torch.Tensor], momentum: float
) -> None:
    """target <- momentum * target + (1 - momentum) * source, for every pair at once."""
    torch._foreach_mul_(target, momentum)
    torch._foreach_add_(target, source, alpha=1.0 - momentum)
