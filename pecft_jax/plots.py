"""PNG figures of continual runs (matplotlib, no display needed).

* :func:`plot_accuracy_matrices` -- one run's class-IL and task-IL accuracy matrices as
  heatmaps (``R[i][j]``: accuracy on task ``j`` after learning task ``i``); every run writes
  it into its workdir as ``accuracy_matrix.png``.
* :func:`plot_accuracy_curves` -- average accuracy over the tasks seen so far after each
  task, one line per group of runs (mean over seeds, a band of +- one standard deviation).
* :func:`plot_forgetting` -- each task's forgetting at the end (best earlier accuracy minus
  final), grouped bars per group of runs (mean, +- one standard deviation).

Groups are ``[(label, [results dict of each seed])]`` as :func:`pecft_jax.report.group_runs`
returns them. Figures are built on ``matplotlib.figure.Figure`` (no pyplot state), so
plotting is safe from any thread.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from pecft_jax import metrics as metrics_lib
from pecft_jax.files import save_figure_atomic


def _figure(width: float, height: float):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), layout="constrained")


def _integer_ticks(ax) -> None:
    """Task numbers on the x axis: whole numbers only."""
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _matrix_array(rows: Sequence[Sequence[float]]) -> np.ndarray:
    """A ragged lower-triangular matrix as a square array, NaN where not measured."""
    size = max(len(rows), max((len(r) for r in rows), default=0))
    out = np.full((len(rows), size), np.nan)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


def plot_accuracy_matrices(results: Mapping, path: str) -> str:
    """Heatmaps of ``results``' class-IL and task-IL accuracy matrices, side by side."""
    panels = [("class-IL", results["accuracy_matrix"]),
              ("task-IL", results.get("task_il_accuracy_matrix") or [])]
    panels = [(name, rows) for name, rows in panels if rows]
    size = max(len(rows) for _, rows in panels)
    fig = _figure(4.2 * len(panels) + 0.8, 0.45 * size + 2.2)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (name, rows) in zip(axes, panels):
        m = _matrix_array(rows)
        image = ax.imshow(m, vmin=0, vmax=100, cmap="viridis")
        if m.shape[0] <= 12:  # the values themselves, where they stay readable
            for (i, j), v in np.ndenumerate(m):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8,
                            color="white" if v < 60 else "black")
        ax.set_xticks(range(m.shape[1]), [str(j) for j in range(m.shape[1])])  # from 0
        ax.set_yticks(range(m.shape[0]), [str(i) for i in range(m.shape[0])])
        ax.set_xlabel("evaluated on task")
        ax.set_ylabel("after learning task")
        final = np.nanmean(m[-1])
        ax.set_title(f"{name} accuracy (%), final average {final:.1f}")
    fig.colorbar(image, ax=list(axes), shrink=0.8)
    fig.suptitle(f"{results['method']} on {results['dataset']} ({len(results['accuracy_matrix'])}"
                 f" tasks)")
    save_figure_atomic(fig, path, dpi=110, bbox_inches="tight")
    return path


def _curve(results: Mapping) -> np.ndarray:
    m = metrics_lib.accuracy_matrix(results["accuracy_matrix"])
    return np.array([np.mean(m[i, :i + 1]) for i in range(m.shape[0])])


def plot_accuracy_curves(groups: Sequence, path: str) -> str:
    """Average accuracy on the tasks seen so far, after each task, per group."""
    fig = _figure(6.4, 4.2)
    ax = fig.subplots()
    for label, runs in groups:
        if runs[0].get("joint"):  # one row over all tasks: no curve (the final value only)
            ax.axhline(np.mean([np.mean(r["accuracy_matrix"][-1]) for r in runs]),
                       linestyle="--", color="grey", label=f"{label} (n={len(runs)})")
            continue
        curves = np.array([_curve(r) for r in runs])
        x = np.arange(1, curves.shape[1] + 1)
        mean = curves.mean(axis=0)
        ax.plot(x, mean, marker="o", label=f"{label} (n={len(runs)})")
        if len(runs) > 1:
            std = curves.std(axis=0, ddof=1)
            ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    _integer_ticks(ax)
    ax.set_xlabel("tasks learnt")
    ax.set_ylabel("average accuracy on the tasks seen (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("accuracy after each task (mean +- std over seeds)")
    save_figure_atomic(fig, path, dpi=110, bbox_inches="tight")
    return path


def task_forgetting(rows: Sequence[Sequence[float]]) -> np.ndarray:
    """Forgetting of each task but the last: its best accuracy before the last task minus
    its final accuracy (the per-task terms of :func:`pecft_jax.metrics.forgetting`)."""
    m = metrics_lib.accuracy_matrix(rows)
    last = m.shape[0] - 1
    return np.array([np.max(m[j:last, j]) - m[last, j] for j in range(last)])


def plot_forgetting(groups: Sequence, path: str) -> str:
    """Per-task forgetting at the end of the runs, grouped bars per group."""
    fig = _figure(6.4, 4.2)
    ax = fig.subplots()
    width = 0.8 / max(1, len(groups))
    for g, (label, runs) in enumerate(groups):
        if runs[0].get("joint"):  # trained once on everything: nothing to forget
            continue
        values = np.array([task_forgetting(r["accuracy_matrix"]) for r in runs])
        if values.shape[1] == 0:
            continue
        x = np.arange(values.shape[1]) + (g - (len(groups) - 1) / 2) * width  # tasks from 0
        std = values.std(axis=0, ddof=1) if len(runs) > 1 else None
        ax.bar(x, values.mean(axis=0), width, yerr=std, capsize=2, label=label)
    ax.axhline(0, color="black", linewidth=0.8)
    _integer_ticks(ax)
    ax.set_xlabel("task")
    ax.set_ylabel("forgetting (points)")
    ax.legend(fontsize=8)
    ax.set_title("forgetting per task at the end (mean +- std over seeds)")
    save_figure_atomic(fig, path, dpi=110, bbox_inches="tight")
    return path
