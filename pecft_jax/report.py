"""Human-readable tables of a run's results."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence


def format_matrix(matrix: Sequence[Sequence[float]], title: str) -> str:
    if not matrix:
        return f"{title}: (empty)"
    width = max(len(row) for row in matrix)
    lines = [title, "after task | " + " ".join(f"T{j + 1:>5}" for j in range(width))]
    for i, row in enumerate(matrix):
        cells = " ".join(f"{v:6.2f}" for v in row)
        lines.append(f"{i + 1:>10} | {cells}")
    return "\n".join(lines)


def _class_order_line(order: Sequence[int], shown: int = 20) -> str:
    """The resolved class order (original class ids, learnt first to last), abbreviated."""
    head = ", ".join(str(c) for c in order[:shown])
    more = f", ... ({len(order)} classes)" if len(order) > shown else ""
    return f"class order: [{head}{more}]"


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def format_results(results: Mapping) -> str:
    parts = [f"method={results['method']} dataset={results['dataset']} "
             f"scenario={results.get('scenario', 'class')} tasks={results['num_tasks']} "
             f"trainable_params={results['trainable_params']:,}",
             *([_class_order_line(results["class_order"])] if results.get("class_order")
               else []),
             format_matrix(results["accuracy_matrix"], "class-IL accuracy matrix (%)"),
             format_matrix(results["task_il_accuracy_matrix"], "task-IL accuracy matrix (%)")]
    m = results["metrics"]
    parts.append("class-IL: " + "  ".join(f"{k}={_fmt(v)}" for k, v in m.items()))
    tm = results.get("task_il_metrics", {})
    if tm:
        parts.append("task-IL:  " + "  ".join(f"{k}={_fmt(v)}" for k, v in tm.items()))
    skipped = results.get("skipped_nonfinite_steps", 0)
    if skipped:
        parts.append(f"WARNING: {skipped} of {results.get('train_steps', '?')} training steps "
                     f"had a non-finite loss or parameters and were skipped "
                     f"(train.on_nonfinite='skip_step')")
    secs = results.get("seconds_per_task", [])
    if secs:
        parts.append("seconds per task: " + " ".join(f"{s:.1f}" for s in secs))
    comp = results.get("compilation")
    if comp:
        parts.append(f"compilation: {comp['xla_compilations']} XLA programs compiled "
                     f"({comp['compile_seconds']:.1f} s), {comp['cache_hits']} read from the "
                     f"persistent cache, {comp['trace_seconds']:.1f} s tracing")
    return "\n".join(parts)


def format_plan(plan: Mapping) -> str:
    """The text ``--dry_run`` prints for :func:`pecft_jax.train.loop.plan_run`'s plan."""
    import json
    lines = [f"method={plan['method']} dataset={plan['dataset']} scenario={plan['scenario']} "
             f"tasks={len(plan['tasks'])} devices={plan['devices']} "
             f"processes={plan['processes']}",
             _class_order_line(plan["class_order"]),
             f"backbone {plan['backbone']['name']}: {plan['backbone']['params']:,} frozen "
             f"parameters (fingerprint {plan['backbone']['fingerprint']})",
             f"trainable parameters at initialisation: {plan['trainable_params']:,}; method "
             f"state: {plan['state_size']:,} scalars",
             "task | classes (original ids)          | train | test  | epochs | steps"]
    for t, task in enumerate(plan["tasks"]):
        classes = ", ".join(str(c) for c in task["classes"][:8]) + (
            ", ..." if len(task["classes"]) > 8 else "")
        lines.append(f"{t + 1:4d} | {classes:32s} | {task['train_examples']:5d} | "
                     f"{task['test_examples']:5d} | {task['epochs']:6d} | {task['steps']}")
    lines.append("resolved config:")
    lines.append(json.dumps(plan["config"], indent=1, sort_keys=True, default=str))
    return "\n".join(lines)
