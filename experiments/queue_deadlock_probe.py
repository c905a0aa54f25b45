"""Does XLA:CPU deadlock on a long queue of data-parallel programs? (``compiler.bound_queue``)

    python experiments/queue_deadlock_probe.py [--steps 300] [--timeout 60] [--runs 2]

Each run is a child process on a host split into two devices: a chained gradient step (a
24-layer tanh MLP of width 128, batch 64 sharded over the devices, the parameters
replicated, so every step ends in an all-reduce) dispatched ``--steps`` times, waiting for
the result every ``wait_every`` steps (never, 40, 30, 20, 16: pecft_jax's
``compiler.MAX_QUEUED_PROGRAMS``). A run counts as hung when it has not finished within
``--timeout`` seconds, or when XLA's watchdog aborted it first (after 40 s in a
rendezvous). On jaxlib 0.10.2 (this project's 2-core VM) the runs that never waited and
those waiting every 40 steps hung; every 30, 20 and 16 finished. Re-run it on a new jaxlib
before relaxing the bound.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

CHILD = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
steps, wait_every = int(sys.argv[1]), int(sys.argv[2])
mesh = Mesh(np.array(jax.devices()), ("data",))
replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
params = jax.device_put([(jnp.full((128, 128), 0.01), jnp.zeros(128)) for _ in range(24)],
                        replicated)

def loss(params, x):
    for w, b in params:
        x = jnp.tanh(x @ w + b)
    return jnp.mean(x ** 2)

step = jax.jit(lambda p, x: jax.tree_util.tree_map(lambda a, g: a - 0.01 * g, p,
                                                   jax.grad(loss)(p, x)),
               out_shardings=replicated, donate_argnums=0)
batches = [jax.device_put(np.random.default_rng(i).normal(size=(64, 128)).astype(np.float32),
                          sharded) for i in range(8)]
for i in range(1, steps + 1):
    params = step(params, batches[i % 8])
    if wait_every and i % wait_every == 0:
        jax.block_until_ready(params)
jax.block_until_ready(params)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    import jaxlib
    print(f"jaxlib {jaxlib.__version__}, {os.cpu_count()} cores, two host devices, "
          f"{args.steps} chained steps a run, hung = not finished in {args.timeout:.0f} s")
    for wait_every in (0, 40, 30, 20, 16):
        outcomes = []
        for _ in range(args.runs):
            try:
                done = subprocess.run([sys.executable, "-c", CHILD, str(args.steps),
                                       str(wait_every)], capture_output=True, text=True,
                                      timeout=args.timeout)
                if done.returncode == 0:
                    outcomes.append("finished")
                elif "Termination timeout" in done.stderr:  # XLA's watchdog, stuck collective
                    outcomes.append("hung (aborted by XLA's watchdog)")
                else:
                    last = (done.stderr.strip().splitlines() or [""])[-1]
                    outcomes.append(f"failed (exit {done.returncode}: {last[-200:]})")
            except subprocess.TimeoutExpired:
                outcomes.append("hung")
        label = f"waiting every {wait_every} steps" if wait_every else "never waiting"
        print(f"  {label:24s} {', '.join(outcomes)}", flush=True)


if __name__ == "__main__":
    main()
