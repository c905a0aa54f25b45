"""Runs several experiments one after another and prints one comparison table.

    python experiments/compare_methods.py --workdir-root workdirs/compare \
        finetune.py:split_mnist l2p.py:split_mnist finetune.py:split_mnist,full,joint

Each entry is ``<config file in experiments/configs>[:arg]``; it runs as its own
``python -m pecft_jax.run`` process (resuming if its workdir already holds a run), and the
table is built from the ``results.json`` files. Also writes ``<root>/table.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

from pecft_jax.files import write_text_atomic

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def workdir_name(entry: str) -> str:
    return entry.replace(".py", "").replace(":", "_").replace(",", "_").replace("/", "_")


def run(entry: str, root: str, overrides: list) -> dict:
    workdir = os.path.join(root, workdir_name(entry))
    results = os.path.join(workdir, "results.json")
    if not os.path.exists(results):
        cmd = [sys.executable, "-m", "pecft_jax.run", "--config",
               os.path.join(CONFIG_DIR, entry), "--workdir", workdir,
               "--config.progress_bar=False", *overrides]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    with open(results) as f:
        return json.load(f)


def fmt(value, digits=2):
    return "n/a" if value is None else f"{value:.{digits}f}"


def table(rows: list) -> str:
    head = ("| run | method | final avg acc (%) | forgetting | avg incremental acc | "
            "task-IL avg acc | task identity (%) | trainable params | s/task |")
    lines = [head, "|" + "---|" * 9]
    for entry, r in rows:
        m, tm = r["metrics"], r.get("task_il_metrics", {})
        secs = r.get("seconds_per_task", [])
        identity = r.get("task_identity_matrix")
        identity = sum(identity[-1]) / len(identity[-1]) if identity else None
        lines.append(
            f"| {entry} | {r['method']}{' (joint)' if r.get('joint') else ''} | {fmt(m['average_accuracy'])} | {fmt(m['forgetting'])} "
            f"| {fmt(m.get('average_incremental_accuracy'))} | {fmt(tm.get('average_accuracy'))} "
            f"| {fmt(identity)} | {r['trainable_params']:,} | {fmt(sum(secs) / max(len(secs), 1), 1)} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("entries", nargs="+")
    parser.add_argument("--workdir-root", default="workdirs/compare")
    parser.add_argument("--override", action="append", default=[],
                        help="--config.key=value passed to every run")
    args = parser.parse_args()
    rows = [(entry, run(entry, args.workdir_root, args.override)) for entry in args.entries]
    text = table(rows)
    machine = f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)"
    footer = f"\ncommand: {' '.join(sys.argv)}\nmachine: {machine}"
    print(text + footer)
    os.makedirs(args.workdir_root, exist_ok=True)
    write_text_atomic(os.path.join(args.workdir_root, "table.md"), text + "\n" + footer + "\n")


if __name__ == "__main__":
    main()
