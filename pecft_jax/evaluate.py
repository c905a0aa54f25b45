"""Re-evaluate a run's saved checkpoint.

    python -m pecft_jax.evaluate --workdir DIR [--task T] [--split train] [--predictions]
                                 [--future_tasks]

Rebuilds the model from DIR/config.json, the pretrained backbone (checked against the
fingerprint stored in the checkpoint) and the checkpoint of task T (default: the last one
saved), evaluates on the test data of tasks 0..T (all tasks with ``--future_tasks`` or when
the run evaluated them, ``eval.future_tasks``) and prints the accuracy row next to the row
recorded during training. Writes DIR/eval_task<T>.json (``--split train``: on the tasks'
training data, un-augmented, DIR/eval_task<T>_train.json). ``--predictions`` also writes
DIR/predictions_task<T>_<split>.npz: every example's ``task``, ``label`` and class-IL
``prediction`` (original class ids), ``seen_classes`` and the ``logits`` over them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Optional

import ml_collections
import numpy as np

from pecft_jax.configs import one_process
from pecft_jax.files import write_json_atomic


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: {workdir!r} is not a pecft_jax workdir "
                                f"(run `python -m pecft_jax.run --config ... --workdir {workdir}` "
                                f"first)")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def evaluate_checkpoint(workdir: str, task: Optional[int] = None, split: str = "test",
                        predictions: bool = False, future_tasks: bool = False) -> dict:
    from pecft_jax.train.loop import ContinualTrainer, RunState
    # a multi-process run's checkpoints are whole on disk: one process evaluates them
    config = one_process(load_run_config(workdir))
    # a run trained with cuDNN's attention is evaluated with XLA's off an NVIDIA GPU
    trainer = ContinualTrainer(config, workdir, write_metrics=False, attention_fallback=True,
                               evaluating=True)
    try:
        saved = trainer.checkpointer.task_steps()
        if not saved:
            raise FileNotFoundError(f"no task checkpoint in {trainer.checkpointer.directory}")
        task = max(saved) if task is None else task
        if task not in saved:
            raise ValueError(f"no checkpoint for task {task}; saved tasks: {sorted(saved)}")
        meta = trainer.checkpointer.read_meta("tasks", task)
        trainer.check_meta(meta)
        restored = trainer.checkpointer.restore("tasks", task)
        run = RunState(restored["trainable"], restored["state"], [], [], {}, [])
        row = trainer.evaluate(run, task, split=split, predictions=predictions,
                               future=future_tasks or trainer.future_tasks)
    finally:
        trainer.close()
    result = {"task": task, "split": split, "class_il": row["class_il"],
              "task_il": row["task_il"]}
    if split == "test":  # what training recorded, to compare with
        result["recorded_class_il"] = meta["accuracy_matrix"][task]
        result["recorded_task_il"] = meta["task_il_accuracy_matrix"][task]
    arrays = row.pop("predictions", None)
    # top-5, old/new-class accuracy, task identity, the confusion over the seen classes
    result.update({k: v for k, v in row.items() if k not in result})
    suffix = "" if split == "test" else f"_{split}"
    write_json_atomic(os.path.join(workdir, f"eval_task{task}{suffix}.json"), result, indent=1)
    if arrays is not None:
        path = os.path.join(workdir, f"predictions_task{task}_{split}.npz")
        with tempfile.NamedTemporaryFile(dir=workdir, suffix=".npz", delete=False) as f:
            np.savez(f, **arrays)  # written aside, then renamed over: never a torn file
        os.replace(f.name, path)
        result["predictions_file"] = path
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--task", type=int, default=None,
                        help="the task whose checkpoint to evaluate (from 0; default: the last)")
    parser.add_argument("--split", choices=("test", "train"), default="test",
                        help="the tasks' test data (default) or training data")
    parser.add_argument("--predictions", action="store_true",
                        help="also write every example's prediction and logits to "
                             "predictions_task<T>_<split>.npz")
    parser.add_argument("--future_tasks", action="store_true",
                        help="also evaluate the tasks after T (not learnt yet by that "
                             "checkpoint)")
    args = parser.parse_args(argv)
    result = evaluate_checkpoint(args.workdir, args.task, args.split, args.predictions,
                                 args.future_tasks)
    fmt = lambda row: " ".join(f"{v:6.2f}" for v in row)
    print(f"task {result['task']} checkpoint, accuracy (%) on the {args.split} data of tasks "
          f"0..{len(result['class_il']) - 1}")
    print(f"  class-IL  re-evaluated: {fmt(result['class_il'])}")
    if "recorded_class_il" in result:
        print(f"  class-IL  recorded:     {fmt(result['recorded_class_il'])}")
    print(f"  task-IL   re-evaluated: {fmt(result['task_il'])}")
    if "recorded_task_il" in result:
        print(f"  task-IL   recorded:     {fmt(result['recorded_task_il'])}")
    if "predictions_file" in result:
        print(f"  predictions written to {result['predictions_file']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
