"""The public API that the worker, the CLI and the benchmarks code against."""

from __future__ import annotations

import inspect

from worker.selftuning import loop


def test_public_names_and_the_signature_of_train():
    from worker.selftuning import (
        RunConfig,
        RunData,
        TrainingCancelled,
        load_folder_dataset,
        make_budget_data,
        train,
    )

    assert inspect.isfunction(train)
    assert train is loop.train
    assert list(inspect.signature(train).parameters) == [
        "config", "data", "out_dir", "on_event", "should_cancel", "metadata", "cache_dir",
    ]
    assert issubclass(TrainingCancelled, Exception)
    assert callable(load_folder_dataset) and callable(make_budget_data)
    assert RunData(class_names=["a", "b"], labeled=[("x.png", 1)]).unlabeled == []
    assert RunConfig().method == "self-tuning"
