"""The PGC loss, the class-wise queue and the key encoder, against the method's definition."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.engine.helpers import tiny_config
from worker.selftuning.backbones import create_backbone, pooled_features
from worker.selftuning.methods import Batch, SelfTuning
from worker.selftuning.pgc import ema_update, enqueue, pgc_loss


def reference_pgc(query, key, labels, queue, temperature):
    """The formula, one sample and one candidate at a time."""
    num_classes, queue_size, _ = queue.shape
    losses = []
    for i in range(len(labels)):
        candidates = [key[i]] + [queue[c, j] for c in range(num_classes)
                                 for j in range(queue_size)]
        scores = torch.stack([query[i] @ candidate / temperature for candidate in candidates])
        log_prob = scores - torch.logsumexp(scores, dim=0)
        c = int(labels[i])
        positives = [0] + [1 + c * queue_size + j for j in range(queue_size)]
        losses.append(-sum(log_prob[p] for p in positives) / (queue_size + 1))
    return torch.stack(losses)


def reference_enqueue(queue, pointers, keys, labels):
    for key, label in zip(keys, labels.tolist(), strict=True):
        queue[label, pointers[label]] = key
        pointers[label] = (pointers[label] + 1) % queue.shape[1]


def random_case(seed: int, num_classes=4, queue_size=3, dim=8, rows=7):
    generator = torch.Generator().manual_seed(seed)
    queue = F.normalize(torch.randn(num_classes, queue_size, dim, generator=generator), dim=2)
    query = F.normalize(torch.randn(rows, dim, generator=generator), dim=1)
    key = F.normalize(torch.randn(rows, dim, generator=generator), dim=1)
    labels = torch.randint(0, num_classes, (rows,), generator=generator)
    return query, key, labels, queue


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pgc_loss_and_gradients_equal_the_per_sample_formula(seed):
    query, key, labels, queue = random_case(seed)
    fast_q = query.clone().requires_grad_(True)
    fast_k = key.clone().requires_grad_(True)
    slow_q = query.clone().requires_grad_(True)
    slow_k = key.clone().requires_grad_(True)

    fast = pgc_loss(fast_q, fast_k, labels, queue, 0.07)
    slow = reference_pgc(slow_q, slow_k, labels, queue, 0.07)
    fast.mean().backward()
    slow.mean().backward()

    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_q.grad, slow_q.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fast_k.grad, slow_k.grad, rtol=1e-4, atol=1e-6)


def test_pgc_loss_is_the_authors_kl_form_minus_log_k_plus_one():
    query, key, labels, queue = random_case(3)
    num_classes, queue_size, _ = queue.shape
    scores = torch.cat([(query * key).sum(1, keepdim=True),
                        query @ queue.reshape(-1, queue.shape[2]).t()], dim=1) / 0.07
    # Target: uniform over the own key and the K keys of the class, zero elsewhere.
    target = torch.zeros_like(scores)
    target[:, 0] = 1 / (queue_size + 1)
    for i, c in enumerate(labels.tolist()):
        target[i, 1 + c * queue_size : 1 + (c + 1) * queue_size] = 1 / (queue_size + 1)
    kl = F.kl_div(torch.log_softmax(scores, dim=1), target, reduction="none").sum(dim=1)

    torch.testing.assert_close(pgc_loss(query, key, labels, queue, 0.07) - math.log(queue_size + 1),
                               kl, rtol=1e-5, atol=1e-5)


def test_enqueue_matches_writing_keys_one_by_one():
    generator = torch.Generator().manual_seed(0)
    fast_queue = torch.zeros(5, 4, 3)
    fast_pointers = torch.zeros(5, dtype=torch.long)
    slow_queue, slow_pointers = fast_queue.clone(), fast_pointers.clone()
    for _ in range(20):
        rows = int(torch.randint(1, 15, (1,), generator=generator))
        keys = torch.randn(rows, 3, generator=generator)
        labels = torch.randint(0, 5, (rows,), generator=generator)
        enqueue(fast_queue, fast_pointers, keys, labels)
        reference_enqueue(slow_queue, slow_pointers, keys, labels)
        assert torch.equal(fast_queue, slow_queue)
        assert torch.equal(fast_pointers, slow_pointers)


def test_class_with_more_keys_than_slots_keeps_its_last_k_in_ring_order():
    queue = torch.zeros(3, 4, 1)
    pointers = torch.tensor([0, 2, 0])
    # Six keys of class 1 (values 1..6) between keys of classes 0 and 2.
    keys = torch.tensor([[10.0], [1.0], [2.0], [20.0], [3.0], [4.0], [5.0], [6.0]])
    labels = torch.tensor([0, 1, 1, 2, 1, 1, 1, 1])

    enqueue(queue, pointers, keys, labels)

    # Class 1 started writing at slot 2: 1,2 -> slots 2,3; 3,4 -> 0,1; 5,6 overwrite 2,3.
    assert queue[1, :, 0].tolist() == [3.0, 4.0, 5.0, 6.0]
    assert pointers.tolist() == [1, 0, 1]  # (2 + 6) mod 4 = 0
    assert queue[0, 0, 0] == 10.0 and queue[2, 0, 0] == 20.0


def test_ema_update_is_the_momentum_average():
    target = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    source = [torch.tensor([5.0, -2.0]), torch.tensor([[0.0]])]
    ema_update(target, source, 0.9)
    torch.testing.assert_close(target[0], torch.tensor([0.9 * 1 + 0.1 * 5, 0.9 * 2 - 0.1 * 2]))
    torch.testing.assert_close(target[1], torch.tensor([[2.7]]))


@pytest.fixture
def self_tuning():
    torch.manual_seed(0)
    config = tiny_config(queue_size=3, projector_dim=8, ema_momentum=0.9)
    model = SelfTuning(create_backbone("test_efficientnet", 3, pretrained=False), 3, config)
    generator = torch.Generator().manual_seed(1)

    def images(count):
        return torch.randn(count, 3, 32, 32, generator=generator)

    batch = Batch(
        labeled=[images(4), images(4)],
        targets=torch.tensor([0, 1, 1, 2]),
        labeled_index=torch.arange(4),
        unlabeled=[images(5), images(5)],
        hidden=torch.tensor([1, -1, 0, 2, 1]),
        unlabeled_index=torch.arange(4, 9),
    )
    return model, batch


def test_loss_uses_the_queue_as_it_was_before_the_batch_is_enqueued(self_tuning):
    model, batch = self_tuning
    model.eval()  # batch norm on running statistics, so the features can be recomputed
    queue_before = model.queue.clone()

    output = model.training_step(batch)
    model.after_step(output, batch)

    with torch.no_grad():
        features = pooled_features(model.backbone, torch.cat([batch.labeled[0],
                                                               batch.unlabeled[0]]))
        queries = F.normalize(model.projector(features), dim=1)
    keys, labels = output.pending["keys"], output.pending["labels"]
    expected = reference_pgc(queries, keys, labels, queue_before, 0.07)
    torch.testing.assert_close(output.terms["pgc_labeled"], expected[:4].mean())
    torch.testing.assert_close(output.terms["pgc_unlabeled"], expected[4:].mean())
    # The same batch's keys are in the queue now; had the loss seen them as positives it
    # would differ.
    assert not torch.equal(model.queue, queue_before)
    after = reference_pgc(queries, keys, labels, model.queue, 0.07)
    assert not torch.allclose(after[:4].mean(), expected[:4].mean())


def test_one_iteration_runs_one_query_forward_one_key_forward_and_one_ema_update(self_tuning):
    model, batch = self_tuning
    model.train()
    calls = {"query": 0, "key": 0}

    def counting(name, forward):
        def wrapped(images):
            calls[name] += 1
            return forward(images)
        return wrapped

    model.backbone.forward_features = counting("query", model.backbone.forward_features)
    model.key_backbone.forward_features = counting("key", model.key_backbone.forward_features)
    optimizer = torch.optim.SGD(model.parameter_groups(), lr=0.1)
    key_before = [p.clone() for p in model.key_projector.parameters()]

    output = model.training_step(batch)
    output.loss.backward()
    optimizer.step()
    model.after_step(output, batch)

    assert calls == {"query": 1, "key": 1}
    for old, key, query in zip(key_before, model.key_projector.parameters(),
                               model.projector.parameters(), strict=True):
        torch.testing.assert_close(key, 0.9 * old + 0.1 * query.detach())
    # Pseudo-labels come from that one forward's logits, detached.
    assert output.pseudo_labels.shape == (5,)
    assert not output.pseudo_labels.requires_grad


def test_enqueued_keys_remember_their_image_and_true_label(self_tuning):
    model, batch = self_tuning
    output = model.training_step(batch)
    model.after_step(output, batch)
    classes, sources, truth = model.queue_entries()
    labels = output.pending["labels"]
    # Each class ring holds 3 slots; sources 0..8 were written where their label points.
    for c, source, known in zip(classes.tolist(), sources.tolist(), truth.tolist(),
                                strict=True):
        assert labels[source] == c
        expected_truth = torch.cat([batch.targets, batch.hidden])[source]
        assert known == expected_truth
