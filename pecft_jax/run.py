"""Run (or resume) a continual experiment.

    python -m pecft_jax.run --config experiments/configs/l2p.py:split_mnist --workdir DIR \
        [--config.train.epochs=3 ...]

Writes DIR/results.json (accuracy matrices, metrics), DIR/metrics.jsonl, TensorBoard events
and orbax checkpoints; re-running the same command on DIR resumes where it stopped.
"""
from __future__ import annotations

import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from pecft_jax.report import format_results

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file[:arg]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints and results go")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    # Our progress at INFO; libraries (orbax logs every checkpoint step) at WARNING.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("pecft_jax").setLevel(logging.INFO)
    from pecft_jax.train.loop import train_and_evaluate  # after flags: JAX starts here
    results = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    print(format_results(results))
    print(f"results written to {_WORKDIR.value}/results.json")


def entry():
    app.run(main)


if __name__ == "__main__":
    entry()
