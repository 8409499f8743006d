"""Self-Tuning training engine: fine-tunes a pre-trained timm backbone on a labeling budget
with Self-Tuning, plain fine-tuning or FixMatch, and exports a plain timm model.

Pure PyTorch + timm; the Celery task, the CLI and the benchmarks all call `train`.
"""

import importlib
from typing import Any

# Where each public name lives. Loaded on first use (PEP 562), so the web can import the
# torch-free parts (`budgets`, `config`) without paying for torch and timm.
_EXPORTS = {
    "DEFAULT_BACKBONE": "backbones",
    "BackboneError": "backbones",
    "offline_backbones": "offline_weights",
    "Budget": "budgets",
    "BudgetError": "budgets",
    "select_labeled": "budgets",
    "split_holdout": "budgets",
    "PRESETS": "config",
    "RunConfig": "config",
    "RunData": "data",
    "load_folder_dataset": "data",
    "make_budget_data": "data",
    "open_rgb": "images",
    "METHODS": "methods",
    "TrainingCancelled": "loop",
    "train": "loop",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_BACKBONE",
    "METHODS",
    "PRESETS",
    "BackboneError",
    "Budget",
    "BudgetError",
    "RunConfig",
    "RunData",
    "TrainingCancelled",
    "load_folder_dataset",
    "make_budget_data",
    "offline_backbones",
    "open_rgb",
    "select_labeled",
    "split_holdout",
    "train",
]
