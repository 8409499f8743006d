"""Label budgets: class-balanced, nested, deterministic subsets of a labeled pool.

One implementation serves the engine, the dataset test split and the experiment API.
"""

from __future__ import annotations

import math
import random
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass


class BudgetError(ValueError):
    """A budget that cannot be drawn from the given pool (message is shown to users)."""


# The smallest fraction a budget can be: 0.0001 % (a label in a million).
MIN_FRACTION = 1e-6
# A count per class as people write it: "4/class", "4 / class", "4 per class".
PER_CLASS_TEXT = re.compile(r"\s*(\d+)\s*(?:/|per)\s*class\s*", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    """How many labels to keep: a fraction of each class, a count per class, or all of them."""

    fraction: float | None = None
    per_class: int | None = None

    @classmethod
    def parse(cls, value: object) -> Budget:
        """Accept 0.05, "all", {"per_class": 4}, {"fraction": 0.05} or a Budget."""
        if isinstance(value, Budget):
            return value
        if isinstance(value, str):
            if value.strip().lower() == "all":
                return cls()
            try:
                value = float(value)
            except ValueError:
                raise BudgetError(
                    f"budget {value!r}: use a fraction in (0, 1], {{'per_class': N}} or 'all'"
                ) from None
        if isinstance(value, bool):
            raise BudgetError("budget must be a fraction, {'per_class': N} or 'all'")
        if isinstance(value, int | float):
            if not 0 < float(value) <= 1:
                raise BudgetError(f"budget fraction {value} must be in (0, 1]")
            if float(value) < MIN_FRACTION:  # named "1e-298%" it would keep one per class
                raise BudgetError(f"budget fraction {value} is below {MIN_FRACTION * 100:g} %: "
                                  "for the fewest labels use {'per_class': 1}")
            return cls(fraction=None if float(value) == 1 else float(value))
        if isinstance(value, dict):
            if set(value) == {"per_class"}:
                count = value["per_class"]
                if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                    raise BudgetError(f"budget per_class {count!r} must be an integer >= 1")
                return cls(per_class=count)
            if set(value) == {"fraction"}:
                return cls.parse(float(value["fraction"]))
        raise BudgetError(
            f"budget {value!r}: use a fraction in (0, 1], {{'per_class': N}} or 'all'"
        )

    @property
    def is_all(self) -> bool:
        return self.fraction is None and self.per_class is None

    @property
    def label(self) -> str:
        """Short human name: '5%', '4/class', 'all'."""
        if self.per_class is not None:
            return f"{self.per_class}/class"
        if self.fraction is not None:
            return f"{self.fraction * 100:g}%"
        return "all"

    def to_json(self) -> object:
        if self.per_class is not None:
            return {"per_class": self.per_class}
        if self.fraction is not None:
            return self.fraction
        return "all"

    def over_every_class(self, class_sizes: Sequence[int]) -> bool:
        """A count per class over every class's size: it keeps every label, as "all" does,
        under another name (the web and the command line refuse it)."""
        return self.per_class is not None and bool(class_sizes) and (
            self.per_class > max(class_sizes))

    def count_for(self, class_size: int) -> int:
        """Labels kept from a class of `class_size` images (at least one)."""
        if self.per_class is not None:
            return min(self.per_class, class_size)
        if self.fraction is not None:
            return min(class_size, max(1, math.floor(self.fraction * class_size + 0.5)))
        return class_size


def class_permutation(indices: Sequence[int], seed: int, class_key: object) -> list[int]:
    """A seeded shuffle of one class's pool indices; prefixes of it give nested subsets."""
    order = sorted(indices)
    random.Random(f"{seed}:{class_key}").shuffle(order)
    return order


def select_labeled(labels: Sequence[int], budget: Budget | object, seed: int) -> list[int]:
    """Indices into `labels` kept as labeled under `budget`, sorted.

    Class-balanced (the same fraction or count from every class), at least one per class,
    deterministic for a seed, and nested: for one seed a smaller budget's subset is contained
    in a larger one's, because every budget takes a prefix of the same per-class permutation.
    """
    budget = Budget.parse(budget)
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_class[int(label)].append(index)
    if not by_class:
        raise BudgetError("the labeled pool is empty")
    chosen: list[int] = []
    for label, members in sorted(by_class.items()):
        chosen.extend(class_permutation(members, seed, label)[: budget.count_for(len(members))])
    return sorted(chosen)


def split_holdout(
    labels: Sequence[int], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Stratified hold-out: (kept, held_out) index lists, at least one held out per class
    and at least one kept per class where the class has two or more images."""
    if not 0 < fraction < 1:
        raise BudgetError(f"hold-out fraction {fraction} must be in (0, 1)")
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_class[int(label)].append(index)
    kept: list[int] = []
    held: list[int] = []
    for label, members in sorted(by_class.items()):
        order = class_permutation(members, seed, f"holdout:{label}")
        n_held = max(1, math.floor(fraction * len(order) + 0.5))
        if len(order) > 1:
            n_held = min(n_held, len(order) - 1)
        held.extend(order[:n_held])
        kept.extend(order[n_held:])
    return sorted(kept), sorted(held)
