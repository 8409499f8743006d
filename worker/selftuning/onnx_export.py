"""A run's exported model as ONNX (`model.onnx`), for serving without PyTorch: ONNX Runtime,
TensorRT, OpenVINO, a browser.

The graph is the timm model itself: it takes what the timm model takes (float32 images,
batch x 3 x the config's input size, resized, centre-cropped and normalised by its
`pretrained_cfg`) and gives its logits, any number of images at a time. The label names and
the run's `config.json` are in the file's metadata, so it says what its outputs mean.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import torch
from timm.data import resolve_data_config

from worker.selftuning.files import CONFIG_FILE
from worker.selftuning.predict import load_exported

INPUT_NAME, OUTPUT_NAME = "pixels", "logits"
# Every runtime in use reads opset 17 (ONNX Runtime since 1.11, TensorRT 8.6, OpenVINO 2022.3).
OPSET = 17


def export_onnx(folder: Path, target: Path) -> None:
    """Write the model exported in `folder` (config.json and model.safetensors) to `target`
    as ONNX. A ValueError when the model does not load, or its architecture has an operation
    ONNX cannot express."""
    exported = load_exported(folder, torch.device("cpu"))
    model = exported.model.float().eval()
    input_size = resolve_data_config({}, model=model)["input_size"]
    try:
        torch.onnx.export(
            model, (torch.zeros(1, *input_size),), str(target), dynamo=False,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=OPSET,
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    except (torch.onnx.errors.OnnxExporterError, RuntimeError) as exc:
        architecture = model.pretrained_cfg["architecture"]
        raise ValueError(f"timm's {architecture!r} does not convert to ONNX: "
                         f"{str(exc).splitlines()[0]}") from None
    graph = onnx.load(str(target))
    graph.doc_string = (f"{INPUT_NAME}: float32 images, batch x {' x '.join(map(str, input_size))}"
                        f", normalised as config's pretrained_cfg says; {OUTPUT_NAME}: one score "
                        "a class, in the order of label_names (softmax for probabilities)")
    metadata = {"label_names": json.dumps(exported.label_names, ensure_ascii=False),
                "config": (folder / CONFIG_FILE).read_text(encoding="utf-8")}
    for key, value in metadata.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(graph, str(target))
