"""Continual-learning metrics from the accuracy matrix.

``R[i][j]`` is the accuracy (in %) on task ``j``'s test data after training on tasks
``0..i``. Only the lower triangle (``j <= i``) is required; entries above the diagonal may be
missing (ragged rows) or NaN -- the forward-transfer metric needs the first super-diagonal
``R[j-1][j]``. With ``T`` tasks:

* average accuracy           ``A_T = mean_j R[T-1][j]``
* average incremental acc.   ``mean_i A_i`` with ``A_i = mean_{j<=i} R[i][j]``
  (Rebuffi et al., iCaRL; Douillard et al.)
* forgetting                 ``mean_{j<T-1} max_{j<=l<T-1} (R[l][j] - R[T-1][j])``
  (Chaudhry et al., 2018; only rows ``l >= j`` are defined); 0 when ``T == 1``
* nonnegative forgetting     ``mean_{j<T-1} max_{j<=l<=T-1} (R[l][j] - R[T-1][j])``: the
  last row in the max, each task's drop clipped at 0 (what L2P's, DualPrompt's and
  HiDe-Prompt's official codes log as forgetting)
* backward transfer (BWT)    ``mean_{j<T-1} (R[T-1][j] - R[j][j])`` (Lopez-Paz & Ranzato,
  GEM); 0 when ``T == 1``
* forward transfer (FWT)     ``mean_{j>0} (R[j-1][j] - b_j)`` with ``b_j`` a reference
  accuracy on task ``j`` (e.g. the untrained model); 0 when ``T == 1``

The per-batch helpers (:func:`class_incremental_accuracy`, :func:`task_incremental_accuracy`)
return accuracy in % too, so their results can go straight into ``R``.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import numpy as np

Matrix = Union[np.ndarray, Sequence[Sequence[float]]]


def accuracy_matrix(R: Matrix) -> np.ndarray:
    """``R`` as a ``(T, T)`` float array, NaN above the diagonal where not measured.

    Accepts a square 2-D array or a list of rows where row ``i`` has between ``i + 1`` and
    ``T`` entries. Raises ``ValueError`` for an empty matrix, a non-square array, rows that
    are too long or miss lower-triangle entries, and NaN/inf in the lower triangle.
    """
    if isinstance(R, np.ndarray) and R.ndim != 2:
        raise ValueError(f"the accuracy matrix must be 2-D (T, T) or a list of rows, got an "
                         f"array of shape {R.shape}")
    if isinstance(R, np.ndarray):
        if R.shape[0] == 0:
            raise ValueError("the accuracy matrix is empty; it needs one row per trained task")
        if R.shape[0] != R.shape[1]:
            raise ValueError(f"the accuracy matrix must be square (T, T), got {R.shape}; row i "
                             f"holds the accuracies on all T tasks after training task i")
        matrix = R.astype(np.float64)
    else:
        rows = [np.asarray(row, dtype=np.float64).reshape(-1) for row in R]
        if not rows:
            raise ValueError("the accuracy matrix is empty; it needs one row per trained task")
        num_tasks = len(rows)
        matrix = np.full((num_tasks, num_tasks), np.nan)
        for i, row in enumerate(rows):
            if row.size > num_tasks:
                raise ValueError(f"row {i} has {row.size} entries but there are only {num_tasks} "
                                 f"rows (tasks); the matrix must be (T, T) or lower-triangular")
            if row.size < i + 1:
                raise ValueError(f"row {i} has {row.size} entries; after task {i} the accuracies "
                                 f"on tasks 0..{i} ({i + 1} entries) are required")
            matrix[i, :row.size] = row
    lower = np.tril(np.ones(matrix.shape, dtype=bool))
    bad = np.argwhere(lower & ~np.isfinite(matrix))
    if bad.size:
        i, j = bad[0]
        raise ValueError(f"R[{i}][{j}] is {matrix[i, j]}; every entry with j <= i must be "
                         f"measured")
    return matrix


def average_accuracy(R: Matrix) -> float:
    """Mean accuracy over all tasks after the last one: ``mean_j R[T-1][j]``."""
    m = accuracy_matrix(R)
    return float(np.mean(m[-1]))


def average_incremental_accuracy(R: Matrix) -> float:
    """Mean over steps of the average accuracy on the tasks seen so far."""
    m = accuracy_matrix(R)
    return float(np.mean([np.mean(m[i, :i + 1]) for i in range(m.shape[0])]))


def _drops(R: Matrix) -> np.ndarray:
    """Each of the first ``T - 1`` tasks' best accuracy before the last task minus its
    final one (empty for ``T == 1``)."""
    m = accuracy_matrix(R)
    last = m.shape[0] - 1
    return np.array([np.max(m[j:last, j]) - m[last, j] for j in range(last)])


def forgetting(R: Matrix) -> float:
    """Average forgetting: best earlier accuracy minus final accuracy, over the first
    ``T - 1`` tasks. 0 for ``T == 1`` (no task has been followed by another). A task's
    value is negative where it ended better than ever before; L2P's and DualPrompt's code
    takes the best over every evaluation, the last included, i.e. the mean over tasks of
    ``max(drop, 0)``, never below this: :func:`nonnegative_forgetting`."""
    drops = _drops(R)
    return float(np.mean(drops)) if drops.size else 0.0


def nonnegative_forgetting(R: Matrix) -> float:
    """The forgetting that L2P's, DualPrompt's and HiDe-Prompt's official codes log: each
    of the first ``T - 1`` tasks' best accuracy over every evaluation, the last included,
    minus its final one (``np.max(acc_matrix, axis=1) - acc_matrix[:, T - 1]``,
    l2p ``train_continual.py``; HiDe-Prompt's engines) -- :func:`forgetting` with each
    task's drop clipped at 0 (the best with the last row included is ``max(best earlier,
    final)``). 0 for ``T == 1``."""
    drops = _drops(R)
    return float(np.mean(np.maximum(drops, 0.0))) if drops.size else 0.0


def backward_transfer(R: Matrix) -> float:
    """BWT: ``mean_{j<T-1} (R[T-1][j] - R[j][j])`` (negative = forgetting). 0 for T == 1."""
    m = accuracy_matrix(R)
    num_tasks = m.shape[0]
    if num_tasks == 1:
        return 0.0
    return float(np.mean([m[-1, j] - m[j, j] for j in range(num_tasks - 1)]))


def forward_transfer(R: Matrix, reference: Sequence[float]) -> float:
    """FWT: ``mean_{j>0} (R[j-1][j] - reference[j])``. Needs ``R[j-1][j]`` measured
    (evaluate task ``j`` before training it) and one reference accuracy per task (entry 0
    is unused). 0 for T == 1."""
    m = accuracy_matrix(R)
    num_tasks = m.shape[0]
    ref = np.asarray(reference, dtype=np.float64).reshape(-1)
    if ref.size != num_tasks:
        raise ValueError(f"reference needs one accuracy per task ({num_tasks}), got {ref.size}")
    if num_tasks == 1:
        return 0.0
    before = np.array([m[j - 1, j] for j in range(1, num_tasks)])
    if not np.all(np.isfinite(before)):
        missing = [j for j in range(1, num_tasks) if not np.isfinite(m[j - 1, j])]
        raise ValueError(f"forward transfer needs R[j-1][j] (task j evaluated before training "
                         f"it); missing for j in {missing}")
    return float(np.mean(before - ref[1:]))


def _test_sizes(test_sizes: Sequence[int], num_tasks: int) -> np.ndarray:
    sizes = np.asarray(test_sizes, np.float64).reshape(-1)
    if sizes.size != num_tasks or np.any(sizes <= 0):
        raise ValueError(f"test_sizes needs one positive count per task ({num_tasks}), got "
                         f"{list(test_sizes)}")
    return sizes


def pooled_accuracy(R: Matrix, test_sizes: Sequence[int]) -> float:
    """Accuracy over all test examples of the tasks after the last one, each task weighted
    by its test-set size: ``sum_j n_j R[T-1][j] / sum_j n_j`` -- what code that scores one
    loader of all seen test data reports (S-Prompts, PyCIL's "total" accuracy). Equals
    :func:`average_accuracy` when the tasks' test sets are equally large."""
    m = accuracy_matrix(R)
    sizes = _test_sizes(test_sizes, m.shape[1])
    return float(np.sum(m[-1] * sizes) / np.sum(sizes))


def pooled_incremental_accuracy(R: Matrix, test_sizes: Sequence[int]) -> float:
    """Mean over steps of the pooled accuracy on the tasks seen so far (row ``i``: ``sum_{j
    <= i} n_j R[i][j] / sum_{j <= i} n_j``) -- the "average accuracy" of the PyCIL lineage's
    logs, whose per-step figure is the pooled one. Equals
    :func:`average_incremental_accuracy` when the tasks' test sets are equally large."""
    m = accuracy_matrix(R)
    sizes = _test_sizes(test_sizes, m.shape[1])
    return float(np.mean([np.sum(m[i, :i + 1] * sizes[:i + 1]) / np.sum(sizes[:i + 1])
                          for i in range(m.shape[0])]))


def summarize(R: Matrix, reference: Optional[Sequence[float]] = None,
              test_sizes: Optional[Sequence[int]] = None) -> Dict[str, float]:
    """All metrics in one dict: ``average_accuracy``, ``average_incremental_accuracy``,
    ``forgetting``, ``nonnegative_forgetting``, ``bwt``; with a ``reference``, ``fwt``;
    with the tasks' ``test_sizes``, ``pooled_accuracy`` and ``pooled_incremental_accuracy``."""
    out = {
        "average_accuracy": average_accuracy(R),
        "average_incremental_accuracy": average_incremental_accuracy(R),
        "forgetting": forgetting(R),
        "nonnegative_forgetting": nonnegative_forgetting(R),
        "bwt": backward_transfer(R),
    }
    if reference is not None:
        out["fwt"] = forward_transfer(R, reference)
    if test_sizes is not None:
        out["pooled_accuracy"] = pooled_accuracy(R, test_sizes)
        out["pooled_incremental_accuracy"] = pooled_incremental_accuracy(R, test_sizes)
    return out


def _check_batch(logits: np.ndarray, labels: np.ndarray) -> None:
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, num_classes), got {logits.shape}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must be ({logits.shape[0]},) to match the logits, got "
                         f"{labels.shape}")
    if logits.shape[0] == 0:
        raise ValueError("no samples: accuracy of an empty task is undefined; check the task's "
                         "test split")


def _class_ids(classes: Union[int, Sequence[int]], num_logits: int, what: str) -> np.ndarray:
    ids = (np.arange(classes) if np.isscalar(classes) else
           np.asarray(classes, dtype=np.int64).reshape(-1))
    if ids.size == 0:
        raise ValueError(f"{what} is empty")
    if ids.min() < 0 or ids.max() >= num_logits:
        raise ValueError(f"{what} must be class ids in [0, {num_logits}), got min {ids.min()} "
                         f"max {ids.max()}")
    return ids


def class_incremental_accuracy(logits, labels, seen_classes: Union[int, Sequence[int]]) -> float:
    """Accuracy (%) when predicting by argmax over all classes seen so far.

    ``seen_classes`` is a count (the first n classes) or the list of seen class ids; logits
    of unseen classes are ignored. Every label must be a seen class.
    """
    return _restricted_accuracy(logits, labels, seen_classes, "seen_classes",
                                "among the seen classes")


def task_incremental_accuracy(logits, labels, task_classes: Sequence[int]) -> float:
    """Accuracy (%) when the task is known: argmax restricted to that task's classes."""
    return _restricted_accuracy(logits, labels, task_classes, "task_classes",
                                "classes of this task")


def top_k_accuracy(logits, labels, seen_classes: Union[int, Sequence[int]], k: int = 5
                   ) -> float:
    """Accuracy (%) when the label is among the ``k`` highest logits of the seen classes
    (``k`` capped at their number; ties broken towards the lower class id)."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    _check_batch(logits, labels)
    classes = _class_ids(seen_classes, logits.shape[1], "seen_classes")
    k = min(int(k), classes.size)
    order = np.argsort(-logits[:, classes], axis=1, kind="stable")[:, :k]
    return float(100.0 * np.mean(np.any(classes[order] == labels[:, None], axis=1)))


def class_il_predictions(logits, seen_classes: Union[int, Sequence[int]]) -> np.ndarray:
    """The class-IL prediction of every example: the argmax over the seen classes."""
    logits = np.asarray(logits)
    classes = _class_ids(seen_classes, logits.shape[1], "seen_classes")
    return classes[np.argmax(logits[:, classes], axis=1)]


def confusion_matrix(labels, predictions, classes: Sequence[int]) -> np.ndarray:
    """``(C, C)`` counts: row = true class, column = predicted class, both in the order of
    ``classes``."""
    index = {int(c): i for i, c in enumerate(classes)}
    out = np.zeros((len(index), len(index)), np.int64)
    np.add.at(out, ([index[int(c)] for c in labels], [index[int(c)] for c in predictions]), 1)
    return out


def subset_accuracy(labels, predictions, classes: Sequence[int]) -> Optional[float]:
    """Accuracy (%) over the examples whose label is one of ``classes`` (None if none is):
    e.g. the old and the new classes after a task."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    chosen = np.isin(labels, np.asarray(list(classes), np.int64))
    return float(100.0 * np.mean(predictions[chosen] == labels[chosen])) if chosen.any() else None


def _restricted_accuracy(logits, labels, allowed, what: str, where: str) -> float:
    """Accuracy (%) of the argmax over the ``allowed`` classes' logits only."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    _check_batch(logits, labels)
    classes = _class_ids(allowed, logits.shape[1], what)
    if not np.all(np.isin(labels, classes)):
        raise ValueError(f"labels {sorted(set(labels.tolist()) - set(classes.tolist()))[:5]} are "
                         f"not {where} {classes.tolist()[:20]}")
    predictions = classes[np.argmax(logits[:, classes], axis=1)]
    return float(100.0 * np.mean(predictions == labels))
