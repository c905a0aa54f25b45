"""Metrics to ``workdir/metrics.jsonl`` and TensorBoard event files; a per-task progress bar."""
from __future__ import annotations

import json
import os
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


class MetricWriter:
    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        try:
            SummaryWriter = _import_summary_writer()
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # TensorBoard logging is optional; JSONL is always written
            self._tb = None

    def discard_after(self, step: int) -> int:
        """Drops the ``metrics.jsonl`` records past global step ``step`` (and a line torn by a
        crash): what a run resumed from a checkpoint at ``step`` will write again. Returns
        the number of records dropped. (TensorBoard event files are append-only; a viewer
        shows the re-run steps' latest values.)"""
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
                if record.get("step", 0) <= step:
                    kept.append(json.dumps(record) + "\n")
                else:
                    dropped += 1
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

    def text(self, tag: str, text: str, step: int = 0) -> None:
        """A text in TensorBoard (e.g. the run's config), shown as markdown."""
        if self.enabled and self._tb is not None:
            self._tb.add_text(tag, f"```\n{text}\n```", int(step))

    def hparams(self, config: Mapping, results: Mapping[str, Optional[float]]) -> None:
        """TensorBoard's HParams view: the run's scalar config values (flattened,
        ``train.learning_rate``) against its final metrics."""
        if not (self.enabled and self._tb is not None):
            return
        from pecft_jax.configs import flatten_config
        params = {k: v for k, v in flatten_config(config, keep_empty=False).items()
                  if isinstance(v, (bool, int, float, str))}
        metrics = {k: float(v) for k, v in results.items() if v is not None}
        self._tb.add_hparams(params, metrics, name="hparams")

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


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
