"""Runs several experiments one after another and prints one comparison table.

    python experiments/compare_methods.py --workdir-root workdirs/compare \
        finetune.py:split_mnist l2p.py:split_mnist finetune.py:split_mnist,full,joint
    python experiments/compare_methods.py --seeds 0,1,2 ease.py:split_mnist slca.py:split_mnist

Each entry is ``<config file in experiments/configs>[:arg]``; it runs as its own
``python -m pecft_jax.run`` process (resuming if its workdir already holds a run), and the
table is built from the ``results.json`` files. With ``--seeds`` every entry runs once per
seed (``--config.seed=S``) and its row gives mean +- standard deviation (ddof=1) over them.
The workdir of a run is named after its entry, its overrides and its seed. Also writes
``<root>/table.md``, ``accuracy_curves.png`` and ``forgetting.png`` (``pecft_jax.plots``;
``python -m pecft_jax.report WORKDIR...`` tabulates and plots any finished runs).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys

from pecft_jax import plots, report
from pecft_jax.files import write_text_atomic

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def workdir_name(entry: str, overrides: list = (), seed=None) -> str:
    """A run's workdir: its entry, a digest of its overrides (another override is another
    run, never the results of an earlier one) and its seed."""
    name = entry.replace(".py", "").replace(":", "_").replace(",", "_").replace("/", "_")
    if overrides:
        name += "_" + hashlib.sha256("\0".join(overrides).encode()).hexdigest()[:8]
    return name if seed is None else f"{name}_seed{seed}"


def run(entry: str, root: str, overrides: list, seed=None) -> dict:
    overrides = list(overrides)
    workdir = os.path.join(root, workdir_name(entry, overrides, seed))
    if seed is not None:
        overrides.append(f"--config.seed={seed}")
    results = os.path.join(workdir, "results.json")
    if not os.path.exists(results):
        cmd = [sys.executable, "-m", "pecft_jax.run", "--config",
               os.path.join(CONFIG_DIR, entry), "--workdir", workdir,
               "--config.progress_bar=False", *overrides]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    with open(results) as f:
        return json.load(f)


def fmt(values, digits=2):
    """A value, or mean +- std (ddof=1) of several; n/a where undefined."""
    values = values if isinstance(values, list) else [values]
    return report.format_mean_std(report.mean_std(values), digits)


def table(rows: list) -> str:
    """One row per entry; ``rows`` = [(entry, [results of each seed])]."""
    head = ("| run | method | final avg acc (%) | avg incremental acc | forgetting | "
            "task-IL avg acc | task identity (%) | trainable params | stored state | s/task "
            "| runs |")
    lines = [head, "|" + "---|" * 11]
    for entry, runs in rows:
        def each(get):
            return [get(r) for r in runs]

        def identity(r):
            m = r.get("task_identity_matrix")
            return sum(m[-1]) / len(m[-1]) if m else None

        r0 = runs[0]
        lines.append(
            f"| {entry} | {r0['method']}{' (joint)' if r0.get('joint') else ''} "
            f"| {fmt(each(lambda r: r['metrics']['average_accuracy']))} "
            f"| {fmt(each(lambda r: r['metrics'].get('average_incremental_accuracy')))} "
            f"| {fmt(each(lambda r: r['metrics']['forgetting']))} "
            f"| {fmt(each(lambda r: r.get('task_il_metrics', {}).get('average_accuracy')))} "
            f"| {fmt(each(identity))} | {r0['trainable_params']:,} "
            f"| {r0.get('state_size', 0):,} "
            f"| {fmt(each(lambda r: sum(r['seconds_per_task']) / len(r['seconds_per_task'])), 1)} "
            f"| {len(runs)} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("entries", nargs="+")
    parser.add_argument("--workdir-root", default="workdirs/compare")
    parser.add_argument("--override", action="append", default=[],
                        help="--config.key=value passed to every run")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated seeds: every entry runs once per seed")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [None]
    rows = [(entry, [run(entry, args.workdir_root, args.override, seed) for seed in seeds])
            for entry in args.entries]
    text = table(rows)
    machine = f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)"
    footer = f"\ncommand: {' '.join(sys.argv)}\nmachine: {machine}"
    print(text + footer)
    os.makedirs(args.workdir_root, exist_ok=True)
    write_text_atomic(os.path.join(args.workdir_root, "table.md"), text + "\n" + footer + "\n")
    # the entries' accuracy curves and per-task forgetting, with std bands over the seeds
    for name, draw in (("accuracy_curves.png", plots.plot_accuracy_curves),
                       ("forgetting.png", plots.plot_forgetting)):
        print("written:", draw(rows, os.path.join(args.workdir_root, name)))


if __name__ == "__main__":
    main()
