"""A finished run's model as ONNX (`GET /api/runs/{id}/model.onnx`, the command line's
`export-onnx`) against a real uvicorn, Redis and SQLite: ONNX Runtime labels the run's test
images as the run's own evaluation did, with the timm model's logits. The run's export is a
real one, trained here by the engine (the `tried` fixture of the Try the model tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime
import redis
import torch

from tests.support import PROJECT_ROOT, add_dataset_row, small_disk, wait_for
from tests.test_experiments_cancel_delete import start_sweep
from tests.test_pages_fixes import finish
from tests.test_run_downloads import record_export
from tests.test_try_model import EXPORTED, tried  # noqa: F401  (a fixture)
from worker.selftuning.images import open_rgb
from worker.selftuning.predict import load_exported


def logits_of(model: bytes | str, pixels: np.ndarray) -> tuple[np.ndarray, dict[str, str]]:
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    (output,) = session.run(["logits"], {"pixels": pixels})
    return output, session.get_modelmeta().custom_metadata_map


def test_the_onnx_model_labels_the_test_images_as_the_run_did(tried, client, tmp_path):  # noqa: F811
    answer = client.get(f"/api/runs/{tried.run_id}/model.onnx")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-disposition"] == (
        f'attachment; filename="run-{tried.run_id}-model.onnx"')
    assert answer.headers["content-type"] == "application/octet-stream"

    # The images as the timm model takes them (its config.json's preprocessing), five at once.
    folder = tmp_path / "export"
    folder.mkdir()
    for name in EXPORTED:
        folder.joinpath(name).write_bytes(
            client.get(f"/api/runs/{tried.run_id}/files/{name}").content)
    exported = load_exported(folder, torch.device("cpu"))
    paths = sorted(tried.answers)
    pixels = torch.stack([exported.transform(open_rgb(Path(path))) for path in paths])
    logits, metadata = logits_of(answer.content, pixels.numpy())
    with torch.inference_mode():
        expected = exported.model(pixels).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    names = json.loads(metadata["label_names"])
    assert names == exported.label_names
    assert [names[i] for i in logits.argmax(axis=1)] == [tried.answers[p] for p in paths]
    assert json.loads(metadata["config"])["label_names"] == names
    assert logits_of(answer.content, pixels[:5].numpy())[0].shape == (5, len(names))

    # Made once: the next download is the same file, and a client holding it gets a 304.
    again = client.get(f"/api/runs/{tried.run_id}/model.onnx",
                       headers={"If-None-Match": answer.headers["etag"]})
    assert again.status_code == 304
    head = client.head(f"/api/runs/{tried.run_id}/model.onnx")
    assert head.headers["etag"] == answer.headers["etag"]
    assert int(head.headers["content-length"]) == len(answer.content)


def test_a_run_without_a_model_that_converts_gets_a_reason(tried, client):  # noqa: F811
    cases = [
        (tried.queued_run_id, 409, f"run {tried.queued_run_id} has no model: it is "
         "queued; a run exports its model when it succeeds"),
        (999999, 404, "run 999999 does not exist"),
        (tried.broken_run_id, 409, f"run {tried.broken_run_id}'s model cannot be given as "
         "ONNX: model.safetensors does not load as timm's 'test_efficientnet' with 3 classes: "
         "Error while deserializing header: header too small"),
    ]
    for run_id, status, detail in cases:
        answer = client.get(f"/api/runs/{run_id}/model.onnx")
        assert (answer.status_code, answer.json()["detail"]) == (status, detail)


def test_the_command_line_writes_the_onnx_of_a_downloaded_checkpoint(tried, client, tmp_path):  # noqa: F811
    checkpoint = tmp_path / "run.zip"
    checkpoint.write_bytes(client.get(f"/api/runs/{tried.run_id}/checkpoint").content)
    out = tmp_path / "deploy" / "model.onnx"
    command = [sys.executable, "-m", "worker.selftuning", "export-onnx",
               "--model", str(checkpoint), "--out", str(out)]
    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr
    with zipfile.ZipFile(checkpoint) as archive:
        config = json.loads(archive.read("config.json"))
    _, height, width = config["pretrained_cfg"]["input_size"]
    # The size the graph takes, not "height x width", which read as any size.
    assert f"wrote {out}: input 'pixels' (float32 images, batch x 3 x {height} x {width}, " \
        in done.stderr
    _, metadata = logits_of(str(out), np.zeros((1, *config["pretrained_cfg"]["input_size"]),
                                                 dtype=np.float32))
    assert json.loads(metadata["label_names"]) == config["label_names"]
    assert sorted(os.listdir(out.parent)) == ["model.onnx"]  # no temporary left

    refused = subprocess.run([*command[:-4], "--model", str(tmp_path / "none.zip"),
                              "--out", str(out)], cwd=PROJECT_ROOT, capture_output=True,
                             text=True)
    assert refused.returncode != 0
    assert refused.stderr.startswith(f"error: --model {tmp_path / 'none.zip'} does not exist")


def test_the_onnx_of_a_run_folder_the_server_cannot_write_still_downloads(tried, server, client):  # noqa: F811
    """Made in the temp folder for each request where the run's folder is read-only (a
    read-only mount), tagged by the model it is made from, and deleted once sent."""
    files = {name: client.get(f"/api/runs/{tried.run_id}/files/{name}").content
             for name in EXPORTED}
    _, (run_id,) = start_sweep(client, add_dataset_row(server.database_url), seeds=[0],
                               methods=["fine-tune"], budgets=["all"])
    folder = server.data_dir / "runs" / str(run_id)
    temps_before = set(Path(tempfile.gettempdir()).glob("selftune-*.onnx"))
    with small_disk(folder, "8m"):
        record_export(server.data_dir, server.database_url, run_id, files)
        finish(server.database_url, redis.Redis.from_url(server.redis_url, decode_responses=True),
               run_id, {"test_top1": 0.5})
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        url = f"/api/runs/{run_id}/model.onnx"
        first, second = client.get(url), client.get(url)
        assert first.status_code == 200, first.text[:300]
        assert first.headers["etag"] == second.headers["etag"]
        assert first.content == second.content
        assert client.get(url, headers={"If-None-Match": first.headers["etag"]}
                          ).status_code == 304
        part = client.get(url, headers={"Range": "bytes=100-199"})
        assert part.status_code == 206 and part.content == first.content[100:200]
        assert sorted(path.name for path in folder.iterdir()) == sorted(files)
    # Each request's file goes once it has been sent (a task after the answer's last byte).
    wait_for(lambda: set(Path(tempfile.gettempdir()).glob("selftune-*.onnx")) == temps_before,
             timeout=10, message="the temporary ONNX files to be deleted")
