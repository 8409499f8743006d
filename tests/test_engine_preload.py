"""The web imports the engine's backbone checks (torch, timm) as it starts, in the background,
so that the new-experiment form's first check does not wait for them (app.engine_preload)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support import LiveServer, add_dataset_row, app_env

# A fresh interpreter: this one has imported torch and timm long ago.
STARTED_APP = """
import json, sys
from fastapi.testclient import TestClient
from app.engine_preload import wait_for_preload
from app.main import create_app
engine = ("torch", "timm", "worker.selftuning.backbones")
before = [name for name in engine if name in sys.modules]
# From this computer, as a server without a token requires (app.guard).
with TestClient(create_app(), base_url="http://localhost", client=("127.0.0.1", 50000)) as client:
    healthy = client.get("/healthz").status_code
    wait_for_preload()
    after = [name for name in engine if name in sys.modules]
print(json.dumps({"before": before, "healthy": healthy, "after": after}))
"""


def started_app(settings, preload: str) -> dict:
    env = app_env(settings.data_dir, settings.sqlalchemy_url, settings.effective_redis_url,
                  SELFTUNE_PRELOAD_ENGINE=preload)
    done = subprocess.run([sys.executable, "-c", STARTED_APP], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_the_web_imports_torch_and_timm_as_it_starts_unless_told_not_to(settings):
    assert started_app(settings, "1") == {
        "before": [], "healthy": 200,
        "after": ["torch", "timm", "worker.selftuning.backbones"]}
    # Off, the first check imports them (as it did before).
    assert started_app(settings, "0") == {"before": [], "healthy": 200, "after": []}


@pytest.mark.server_env(SELFTUNE_PRELOAD_ENGINE="1")
def test_a_check_asked_while_the_engine_is_loading_waits_for_it_and_answers(
    live_server: LiveServer,
) -> None:
    """Asked as the server starts, the check waits for the background import instead of
    importing torch and timm a second time at once, and answers as any check does."""
    assert live_server.env["SELFTUNE_PRELOAD_ENGINE"] == "1"  # the marker's setting
    dataset_id = add_dataset_row(live_server.database_url)
    sweep = {"dataset_id": dataset_id, "backbone": "tf_efficientnet_lite0",
             "methods": ["fine-tune", "self-tuning"], "budgets": ["50%"], "seeds": [0],
             "preset": "quick"}
    with live_server.client() as client:
        checked = client.post("/api/experiments/check", json=sweep)
        refused = client.post("/api/experiments/check",
                              json={**sweep, "backbone": "no_such_net"})
    assert checked.status_code == 200, checked.text
    assert checked.json()["runs"] == 2
    assert checked.json()["backbone"] == "tf_efficientnet_lite0"
    assert refused.status_code == 422
    assert "unknown backbone 'no_such_net'" in refused.text
    assert "Traceback" not in live_server.process.log()
