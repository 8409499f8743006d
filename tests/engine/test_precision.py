"""The CUDA training settings, bf16 autocast and channels_last, exercised on the CPU.

This machine has no GPU, so `loop.precision_for` is patched to give the CPU what it gives
CUDA; CPU autocast casts the same operations (convolutions, linear layers) to bf16. What is
checked is the engine's own handling of them: losses and contrastive scores in float32, the
queue, the key encoder and the weights kept in float32, the export in timm's layout. Kernels
and speed on a GPU are `bench/engine.py`'s CUDA part.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.data import create_transform, resolve_data_config

from tests.engine.helpers import predicted_classes, tiny_config
from worker.selftuning import METHODS, RunData, loop, methods, open_rgb, train
from worker.selftuning.checkpoint import load_checkpoint
from worker.selftuning.loop import Precision, precision_for

CUDA_SETTINGS = Precision(torch.bfloat16, torch.channels_last)


def plain_timm_predictions(out: Path, data: RunData) -> torch.Tensor:
    """Test-image classes from the export in `out`, loaded on the CPU with plain timm."""
    config = json.loads((out / "config.json").read_text())
    model = timm.create_model(
        config["architecture"], pretrained=True, num_classes=config["num_classes"],
        pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"),
                                    **config["pretrained_cfg"]),
    ).eval()
    transform = create_transform(**resolve_data_config(pretrained_cfg=config["pretrained_cfg"]))
    with torch.no_grad():
        images = torch.stack([transform(open_rgb(path)) for path, _ in data.test])
        return model(images).argmax(dim=1)


def test_cuda_trains_in_bf16_and_channels_last_and_the_cpu_in_float32():
    assert precision_for(torch.device("cuda", 0)) == CUDA_SETTINGS
    assert precision_for(torch.device("cpu")) == Precision(None, torch.contiguous_format)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_run_with_the_cuda_settings_keeps_float32_where_it_matters(
    method: str, tmp_path: Path, shapes_data: RunData, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loop, "precision_for", lambda device: CUDA_SETTINGS)
    steps: list[dict] = []
    method_class = METHODS[method]
    training_step = method_class.training_step

    projected: list[tuple] = []  # Self-Tuning's key projector: what it gets and gives

    def observed_step(self, batch):
        if method == "self-tuning" and not projected:
            self.key_projector.register_forward_hook(lambda module, inputs, out: projected.append(
                (inputs[0].dtype, out.dtype, torch.is_autocast_enabled("cpu"))))
        output = training_step(self, batch)
        steps.append({
            "autocast": torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16,
            "channels_last": all(view.is_contiguous(memory_format=torch.channels_last)
                                 for view in batch.labeled + batch.unlabeled),
            "loss": output.loss.dtype,
        })
        return output

    monkeypatch.setattr(method_class, "training_step", observed_step)
    scored: list[tuple] = []
    pgc_loss = methods.pgc_loss

    def observed_pgc(query, key, labels, queue, temperature):
        scored.append((query.dtype, key.dtype, queue.dtype, torch.is_autocast_enabled("cpu")))
        return pgc_loss(query, key, labels, queue, temperature)

    monkeypatch.setattr(methods, "pgc_loss", observed_pgc)
    events: list[dict] = []
    metrics = train(tiny_config(method=method, iterations=4), shapes_data, tmp_path,
                    on_event=events.append)

    assert len(steps) == 4
    assert all(s == {"autocast": True, "channels_last": True, "loss": torch.float32}
               for s in steps)
    if method == "self-tuning":
        # Scores at 1/0.07 scale: the contrastive loss leaves autocast for float32.
        assert scored == [(torch.float32, torch.float32, torch.float32, False)] * 4
        # Keys are projected in float32 like the queries, not rounded to bf16 on the way in.
        assert projected == [(torch.float32, torch.float32, False)] * 4
    for event in events:
        if event["type"] == "progress":
            assert all(math.isfinite(value) for value in event["losses"].values())
    state = load_checkpoint(tmp_path / "state" / "checkpoint.pt")["model"]
    floating = {name: t.dtype for name, t in state.items() if t.is_floating_point()}
    assert set(floating.values()) == {torch.float32}
    if method == "self-tuning":
        assert {"queue", "key_projector.weight"} <= set(floating)

    exported = load_file(str(tmp_path / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in exported.values() if t.is_floating_point())
    predicted = plain_timm_predictions(tmp_path, shapes_data)
    assert predicted.tolist() == predicted_classes(tmp_path, shapes_data)
    truth = torch.tensor([label for _, label in shapes_data.test])
    assert (predicted == truth).float().mean().item() == pytest.approx(metrics["test_top1"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_run_on_cuda_exports_a_model_that_predicts_alike_on_the_cpu(
    method: str, tmp_path: Path, shapes_data: RunData
) -> None:
    metrics = train(tiny_config(method=method, iterations=4, device="cuda"), shapes_data,
                    tmp_path)
    assert 0 <= metrics["test_top1"] <= 1
    on_cpu = plain_timm_predictions(tmp_path, shapes_data).tolist()
    on_gpu = predicted_classes(tmp_path, shapes_data)
    # cuDNN may use TF32 and other kernels than the CPU: allow a rare tie to flip.
    agreement = sum(a == b for a, b in zip(on_cpu, on_gpu, strict=True)) / len(on_gpu)
    assert agreement >= 0.9
