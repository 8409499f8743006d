"""Self-Tuning training engine: fine-tunes a pre-trained timm backbone on a labeling budget
with Self-Tuning, plain fine-tuning or FixMatch, and exports a plain timm model.

Pure PyTorch + timm; the Celery task, the CLI and the benchmarks all call `train`.
"""

from worker.selftuning.backbones import DEFAULT_BACKBONE, BackboneError, offline_backbones
from worker.selftuning.budgets import Budget, BudgetError, select_labeled, split_holdout
from worker.selftuning.config import PRESETS, RunConfig
from worker.selftuning.data import RunData, load_folder_dataset, make_budget_data
from worker.selftuning.images import open_rgb
from worker.selftuning.methods import METHODS
from worker.selftuning.train import TrainingCancelled, train

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
