"""Metrics to ``workdir/metrics.jsonl``, TensorBoard event files and (optionally) Weights &
Biases; a per-task progress bar."""
from __future__ import annotations

import json
import os
import secrets
import string
import sys
from typing import Mapping, Optional

from pecft_jax.files import write_text_atomic


def _import_summary_writer():
    """``tensorboardX.SummaryWriter``, imported without PyTorch: tensorboardX imports torch
    whenever it is installed, only to accept torch tensors (we log floats), and that costs
    1.5-3 s of every start-up. A torch the process has already imported is left alone."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` raise ImportError, for this import only
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


WANDB_ID_FILE = "wandb_run_id.txt"


def start_wandb(workdir: str, settings: Mapping, config: Mapping):
    """A Weights & Biases run for the workdir (``settings``: the config's ``wandb`` section;
    ``config``: the run's config, flattened into W&B's). Its id is kept in the workdir, so a
    resumed run continues the same W&B run. Raises a clear error when wandb is missing."""
    from pecft_jax.configs import check_wandb_installed, flatten_config
    check_wandb_installed({"wandb": dict(settings)})
    import wandb
    id_path = os.path.join(workdir, WANDB_ID_FILE)
    if os.path.exists(id_path):
        with open(id_path) as f:
            run_id = f.read().strip()
    else:
        # W&B's run ids: letters and digits, unique within the project
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits)
                         for _ in range(12))
        write_text_atomic(id_path, run_id + "\n")
    run = wandb.init(
        project=settings["project"], entity=settings.get("entity") or None,
        name=settings.get("name") or os.path.basename(os.path.abspath(workdir)),
        tags=list(settings.get("tags", ())) or None, mode=settings.get("mode") or None,
        dir=workdir, id=run_id, resume="allow",
        config=flatten_config(dict(config), keep_empty=False))
    # Records are plotted against the run's global step, a field of each record, not W&B's
    # own step: several records share a global step (a task without gradient steps logs
    # its evaluation at the step of the one before), which W&B's step would merge.
    run.define_metric("global_step")
    run.define_metric("*", step_metric="global_step")
    return run


class MetricWriter:
    """Writes scalars to ``metrics.jsonl``, TensorBoard (when tensorboardX imports) and,
    when ``wandb`` settings name a project, Weights & Biases."""

    def __init__(self, workdir: str, enabled: bool = True, wandb: Optional[Mapping] = None,
                 config: Optional[Mapping] = None):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        self._wandb = None
        # W&B starts with the first record, after the run's resume checks have passed
        self._wandb_start = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        try:
            SummaryWriter = _import_summary_writer()
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # TensorBoard logging is optional; JSONL is always written
            self._tb = None
        if wandb is not None and wandb.get("project"):
            self._wandb_start = lambda: start_wandb(workdir, wandb, config or {})

    def _wandb_run(self):
        if self._wandb is None and self._wandb_start is not None:
            self._wandb, self._wandb_start = self._wandb_start(), None
        return self._wandb

    def discard_after(self, step: int, rerun_from_task: Optional[int] = None) -> int:
        """Drops what a run resumed from a checkpoint at global step ``step`` will write
        again: the ``metrics.jsonl`` records past that step, a line torn by a crash, and the
        evaluation records (records that carry a task and no ``train/`` key) of tasks
        ``rerun_from_task`` and later -- a task without gradient steps logs its evaluation
        at the step where the previous one ended. ``step=-1`` drops every record (a run
        starting over). Returns the number of records dropped; the file is rewritten only
        when there are any. (TensorBoard event files are append-only; a viewer shows the
        re-run steps' latest values.)"""
        if not self.enabled:
            return 0
        path = self._jsonl.name
        self._jsonl.close()
        kept, dropped = [], 0
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    dropped += 1
                    continue
                evaluation = (rerun_from_task is not None
                              and record.get("task", -1) >= rerun_from_task
                              and not any(key.startswith("train/") for key in record))
                if record.get("step", 0) <= step and not evaluation:
                    kept.append(json.dumps(record) + "\n")
                else:
                    dropped += 1
        if dropped:
            write_text_atomic(path, "".join(kept))
        self._jsonl = open(path, "a")
        return dropped

    def write(self, step: int, scalars: Mapping[str, float], task: Optional[int] = None) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **({"task": task} if task is not None else {}),
                  **{k: float(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, float(value), int(step))
        if self._wandb_run() is not None:
            # a resumed run logs the records after its checkpoint again: W&B shows them
            # twice at their global step, with the same values
            self._wandb.log({"global_step": int(step), **({"task": task} if task is not None
                                                           else {}),
                             **{k: float(v) for k, v in scalars.items()}})

    def text(self, tag: str, text: str, step: int = 0) -> None:
        """A text in TensorBoard (e.g. the run's config), shown as markdown."""
        if self.enabled and self._tb is not None:
            self._tb.add_text(tag, f"```\n{text}\n```", int(step))

    def hparams(self, config: Mapping, results: Mapping[str, Optional[float]]) -> None:
        """TensorBoard's HParams view: the run's scalar config values (flattened,
        ``train.learning_rate``) against its final metrics."""
        metrics = {k: float(v) for k, v in results.items() if v is not None}
        if self._wandb_run() is not None:  # the config went in at wandb.init
            self._wandb.summary.update(metrics)
        if not (self.enabled and self._tb is not None):
            return
        from pecft_jax.configs import flatten_config
        params = {k: v for k, v in flatten_config(config, keep_empty=False).items()
                  if isinstance(v, (bool, int, float, str))}
        self._tb.add_hparams(params, metrics, name="hparams")

    def close(self, failed: bool = False) -> None:
        """Closes the files; a W&B run is marked failed (exit code 1) when the run did not
        finish (an exception, a preemption: its resume continues the same W&B run)."""
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish(exit_code=1 if failed else 0)
            self._wandb = None


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int, initial: int = 0, desc: str = "", enabled: bool = True):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, leave=False,
                dynamic_ncols=True, mininterval=1.0)
