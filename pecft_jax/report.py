"""Human-readable tables of runs' results, and the report over many workdirs.

    python -m pecft_jax.report WORKDIR [WORKDIR ...] [--out DIR]

groups the runs by everything in their config but the seed (and the keys that only say how
a run executes, ``configs.EXECUTION_KEYS``), prints one row per group with mean +- std
(ddof 1) over its seeds, and writes ``table.md``, ``table.csv``, ``accuracy_curves.png``
and ``forgetting.png`` into DIR (default: the current folder).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import sys
from typing import Callable, List, Mapping, Optional, Sequence, Tuple


def format_matrix(matrix: Sequence[Sequence[float]], title: str) -> str:
    if not matrix:
        return f"{title}: (empty)"
    width = max(len(row) for row in matrix)
    # tasks are numbered from 0, as in every file, log, key and option (README)
    lines = [title, "after task | " + " ".join(f"T{j:>5}" for j in range(width))]
    for i, row in enumerate(matrix):
        cells = " ".join(f"{v:6.2f}" for v in row)
        lines.append(f"{i:>10} | {cells}")
    return "\n".join(lines)


def _class_order_line(order: Sequence[int], shown: int = 20) -> str:
    """The resolved class order (original class ids, learnt first to last), abbreviated."""
    head = ", ".join(str(c) for c in order[:shown])
    more = f", ... ({len(order)} classes)" if len(order) > shown else ""
    return f"class order: [{head}{more}]"


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}"


# The lower and upper bound of the demo benchmarks on their offline backbones (sequential
# fine-tuning and joint training over 3 seeds; the file says how it was measured).
BOUNDS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets",
                           "demo_bounds.json")


def verdict_line(results: Mapping, bounds_file: str = BOUNDS_FILE) -> Optional[str]:
    """Where a run's final average accuracy lies between the shipped lower and upper bound
    of its benchmark -- only for a run of the very setting the bounds were measured on
    (benchmark, the bundled backbone, tasks and class order); None otherwise."""
    config = results.get("config", {})
    benchmark = config.get("benchmark")
    if (results.get("method") == "finetune" or results.get("joint")
            or not os.path.exists(bounds_file)):
        return None
    with open(bounds_file) as f:
        table = json.load(f).get(benchmark)
    # the bounds' backbone: the bundled ViT ('demo') unless the entry names another
    backbone = table.get("backbone_checkpoint", "demo") if table else None
    if (table is None or config.get("backbone", {}).get("checkpoint") != backbone
            or results.get("num_tasks") != table["num_tasks"]
            or list(results.get("class_order", [])) != table["class_order"]):
        return None
    low, high = table["finetune"]["mean"], table["joint"]["mean"]
    accuracy = results["metrics"]["average_accuracy"]
    share = 100.0 * (accuracy - low) / (high - low)
    return (f"verdict: {results['method']} reaches {accuracy:.2f} on {benchmark}, between "
            f"sequential fine-tuning ({low:.2f} +- {table['finetune']['std']:.2f}) and joint "
            f"training ({high:.2f} +- {table['joint']['std']:.2f}; {len(table['seeds'])} "
            f"seeds each, {os.path.basename(bounds_file)}): {share:.0f}% of the way from the "
            f"lower to the upper bound")


def format_results(results: Mapping) -> str:
    parts = [f"method={results['method']} dataset={results['dataset']} "
             f"scenario={results.get('scenario', 'class')} tasks={results['num_tasks']} "
             f"trainable_params={results['trainable_params']:,}",
             *([_class_order_line(results["class_order"])] if results.get("class_order")
               else []),
             format_matrix(results["accuracy_matrix"], "class-IL accuracy matrix (%)"),
             format_matrix(results["task_il_accuracy_matrix"], "task-IL accuracy matrix (%)")]
    rows = results["accuracy_matrix"]
    if any(len(row) > i + 1 for i, row in enumerate(rows)):
        parts.append("(right of the diagonal: tasks not learnt yet, eval.future_tasks)")
    reference = results.get("reference_accuracy")
    if reference:
        parts.append("reference before any task (FWT's b_j): class-IL "
                     + " ".join(f"{v:.2f}" for v in reference["class_il"]) + "; task-IL "
                     + " ".join(f"{v:.2f}" for v in reference["task_il"]))
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
    verdict = verdict_line(results)
    if verdict:
        parts.append(verdict)
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
        lines.append(f"{t:4d} | {classes:32s} | {task['train_examples']:5d} | "
                     f"{task['test_examples']:5d} | {task['epochs']:6d} | {task['steps']}")
    lines.append("resolved config:")
    lines.append(json.dumps(plan["config"], indent=1, sort_keys=True, default=str))
    return "\n".join(lines)


# ------------------------------------------------------------------ many runs, grouped
def setting_of(results: Mapping) -> dict:
    """The flat config of a run (values as JSON text) without its seed and execution-only
    keys: what runs of one setting share. A key the run's config lacks (written before the
    key existed) has its default value, as it had in that run."""
    from pecft_jax.configs import base_config, flatten_config, is_execution_key
    from pecft_jax.methods import get_method_class
    config = results.get("config", {})
    flat = dict(flatten_config(base_config().to_dict()))
    try:  # the method's own defaults (config files hold every method field)
        method = get_method_class(config.get("method", {}).get("name", ""))
        flat.update(flatten_config({"method": dataclasses.asdict(method.Config())}))
    except (ValueError, KeyError, TypeError):  # a method this version does not have
        pass
    flat.update(flatten_config(config))
    return {k: json.dumps(v, sort_keys=True, default=str) for k, v in flat.items()
            if k != "seed" and not is_execution_key(k)}


def group_runs(runs: Sequence[Mapping]) -> List[Tuple[str, List[Mapping]]]:
    """``[(label, [results of each seed])]``, one entry per setting, in first-seen order.
    A label is the method (``(joint)`` for the upper bound) plus the config values that set
    it apart from the other groups (at most three, the rest counted)."""
    groups: dict = {}
    for r in runs:
        groups.setdefault(json.dumps(setting_of(r), sort_keys=True), []).append(r)
    settings = [setting_of(members[0]) for members in groups.values()]
    out = []
    for setting, members in zip(settings, groups.values()):
        label = members[0]["method"] + (" (joint)" if members[0].get("joint") else "")
        # what tells it from the other settings of the same method
        peers = [s for s in settings if s.get("method.name") == setting.get("method.name")]
        keys = sorted({k for s in peers for k in s})
        differs = [f"{k}={json.loads(setting[k]) if k in setting else '-'}" for k in keys
                   if k != "scenario.joint" and len({s.get(k) for s in peers}) > 1]
        if differs:
            shown = ", ".join(differs[:3]) + (f", +{len(differs) - 3}" if len(differs) > 3
                                             else "")
            label += f" [{shown}]"
        out.append((label, members))
    return out


def mean_std(values: Sequence[Optional[float]]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (ddof 1; None for one value) of the defined
    values; (None, None) when there are none."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, None
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def _task_identity(r: Mapping) -> Optional[float]:
    m = r.get("task_identity_matrix")
    return sum(m[-1]) / len(m[-1]) if m else None


# (column, how a run gives it, decimals)
COLUMNS: Tuple[Tuple[str, Callable, int], ...] = (
    ("final avg acc", lambda r: r["metrics"]["average_accuracy"], 2),
    ("avg incremental acc", lambda r: r["metrics"].get("average_incremental_accuracy"), 2),
    ("forgetting", lambda r: r["metrics"].get("forgetting"), 2),
    ("BWT", lambda r: r["metrics"].get("bwt"), 2),
    ("FWT", lambda r: r["metrics"].get("fwt"), 2),
    ("pooled acc", lambda r: r["metrics"].get("pooled_accuracy"), 2),
    ("task-IL avg acc", lambda r: r.get("task_il_metrics", {}).get("average_accuracy"), 2),
    ("task identity", _task_identity, 2),
    ("trainable params", lambda r: r.get("trainable_params"), 0),
    ("s/task", lambda r: (sum(r["seconds_per_task"]) / len(r["seconds_per_task"])
                          if r.get("seconds_per_task") else None), 1),
)


def summarize_groups(groups) -> List[dict]:
    """One dict per group: its label, number of runs, seeds, and (mean, std) per column."""
    rows = []
    for label, runs in groups:
        row = {"setting": label, "runs": len(runs),
               "seeds": [r.get("config", {}).get("seed") for r in runs]}
        for name, get, _ in COLUMNS:
            row[name] = mean_std([get(r) for r in runs])
        rows.append(row)
    return rows


def format_mean_std(value: Tuple[Optional[float], Optional[float]], digits: int) -> str:
    """``mean +- std`` of a :func:`mean_std` pair (the mean alone for one run; n/a)."""
    mean, std = value
    if mean is None:
        return "n/a"
    text = f"{mean:,.{digits}f}"
    if std is None or (digits == 0 and std == 0):  # (one run; counts that never vary)
        return text
    return f"{text} +- {std:,.{digits}f}"


def markdown_table(rows: Sequence[dict]) -> str:
    """The groups as a markdown table; columns no run defines are left out."""
    shown = [(n, d) for n, _, d in COLUMNS if any(r[n][0] is not None for r in rows)]
    lines = ["| setting | runs | " + " | ".join(n for n, _ in shown) + " |",
             "|---|---|" + "---|" * len(shown)]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['runs']} | "
                     + " | ".join(format_mean_std(r[n], d) for n, d in shown) + " |")
    return "\n".join(lines)


def csv_table(rows: Sequence[dict]) -> str:
    """The groups as CSV: for every column its mean and its std (empty where undefined)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["setting", "runs", "seeds"] + [f"{n} {part}" for n, _, _ in COLUMNS
                                                     for part in ("mean", "std")])
    for r in rows:
        writer.writerow([r["setting"], r["runs"], " ".join(str(s) for s in r["seeds"])]
                        + ["" if v is None else v for n, _, _ in COLUMNS for v in r[n]])
    return out.getvalue()


def load_runs(workdirs: Sequence[str]) -> List[dict]:
    """The ``results.json`` of each workdir; a workdir without one is an error naming it."""
    runs = []
    for workdir in workdirs:
        path = os.path.join(workdir, "results.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{workdir} has no results.json: the run has not finished "
                                    "(re-run its command to resume it)")
        with open(path) as f:
            runs.append(json.load(f))
    return runs


def write_report(runs: Sequence[Mapping], out_dir: str) -> dict:
    """``table.md``, ``table.csv``, ``accuracy_curves.png`` and ``forgetting.png`` of the
    runs, grouped, in ``out_dir``; returns the paths and the markdown."""
    from pecft_jax import plots
    from pecft_jax.files import write_text_atomic
    os.makedirs(out_dir, exist_ok=True)
    groups = group_runs(runs)
    rows = summarize_groups(groups)
    text = markdown_table(rows)
    paths = {"table.md": os.path.join(out_dir, "table.md"),
             "table.csv": os.path.join(out_dir, "table.csv")}
    write_text_atomic(paths["table.md"], text + "\n")
    write_text_atomic(paths["table.csv"], csv_table(rows))
    paths["accuracy_curves.png"] = plots.plot_accuracy_curves(
        groups, os.path.join(out_dir, "accuracy_curves.png"))
    paths["forgetting.png"] = plots.plot_forgetting(groups, os.path.join(out_dir,
                                                                         "forgetting.png"))
    return {"paths": paths, "markdown": text}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pecft_jax.report",
        description="Group finished runs by setting (all of the config but the seed) and "
                    "write mean +- std tables and plots.")
    parser.add_argument("workdirs", nargs="+", help="run folders holding results.json")
    parser.add_argument("--out", default=".", help="where table.md, table.csv and the PNGs go")
    args = parser.parse_args(argv)
    try:
        report = write_report(load_runs(args.workdirs), args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(report["markdown"])
    print("written: " + ", ".join(report["paths"].values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
