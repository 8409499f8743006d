"""Dependencies point one way: the web stays free of torch, the engine free of the web."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support import PROJECT_ROOT


def imported_after(statement: str, env: dict[str, str] | None = None) -> set[str]:
    code = f"import sys\n{statement}\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, check=True,
                         capture_output=True, text=True,
                         env={**os.environ, **(env or {})}).stdout
    return {name.split(".")[0] for name in out.split()}


def test_the_web_app_starts_without_importing_torch():
    modules = imported_after("import app.main; app.main.create_app")
    assert "torch" not in modules and "timm" not in modules


def test_the_celery_worker_loads_its_tasks_without_importing_torch():
    """Torch is imported in the pool process that trains, after the fork: in the parent its
    threads (and on a GPU machine, CUDA) would be copied into every child half-made."""
    modules = imported_after("import worker.tasks",
                             env={"SELFTUNE_REDIS_URL": "redis://127.0.0.1:9/0"})
    assert "torch" not in modules and "timm" not in modules


def test_the_engine_imports_nothing_of_the_web_the_queue_or_the_database():
    modules = imported_after("import worker.selftuning.loop, worker.selftuning.cli")
    assert {"fastapi", "celery", "sqlalchemy", "app", "redis", "starlette"} & modules == set()


def test_method_names_known_without_torch_match_the_registry():
    from worker.selftuning import METHODS
    from worker.selftuning.config import METHOD_NAMES

    assert sorted(METHODS) == sorted(METHOD_NAMES)
