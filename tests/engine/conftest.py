"""Fixtures for the engine tests: a small synthetic dataset of coloured shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.engine.helpers import write_shapes_dataset
from worker.selftuning import RunData, load_folder_dataset, make_budget_data


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The engine tests use tiny models: a second thread gains nothing and, on a machine
    shared with other processes, mostly waits."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="session")
def shapes_data(shapes_root: Path) -> RunData:
    """A run's data: 4 labeled per class, the rest unlabeled with hidden labels, + 4 without."""
    class_names, train_items, test_items, unlabeled = load_folder_dataset(shapes_root)
    data, _ = make_budget_data(class_names, train_items, test_items, unlabeled,
                               {"per_class": 4}, seed=0)
    return data
