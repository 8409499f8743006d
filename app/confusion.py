"""A run's confusion matrix in its two forms: dense, as the engine reports it (classes² numbers),
and sparse, as a run keeps it in the database and the run page reads it."""

from __future__ import annotations

from itertools import compress
from typing import TypedDict


class SparseConfusion(TypedDict):
    size: int
    diagonal: list[int]
    row_totals: list[int]
    cells: list[list[int]]


def sparse_confusion(matrix: list[list[int]]) -> SparseConfusion:
    """The matrix without its zeros: its diagonal, the totals of its rows (a true class's test
    images) and each other cell that is not 0 as [true, predicted, count], by true class then
    predicted one."""
    # compress() skips the zeros in C, over column numbers made once: the 25 million cells of
    # 5,000 classes take 0.2 s, where a Python test of each took 1.0 s and compress() over a
    # range, which makes each number anew, 0.6 s.
    columns = list(range(len(matrix)))
    cells = []
    for true, row in enumerate(matrix):
        cells.extend([true, predicted, row[predicted]]
                     for predicted in compress(columns, row) if predicted != true)
    return {"size": len(matrix), "diagonal": [row[i] for i, row in enumerate(matrix)],
            "row_totals": [sum(row) for row in matrix], "cells": cells}


def dense_confusion(sparse: SparseConfusion) -> list[list[int]]:
    """The whole matrix a sparse one stands for, equal to the one it was made from."""
    size = sparse["size"]
    matrix = [[0] * size for _ in range(size)]
    for true, count in enumerate(sparse["diagonal"]):
        matrix[true][true] = count
    for true, predicted, count in sparse["cells"]:
        matrix[true][predicted] = count
    return matrix
