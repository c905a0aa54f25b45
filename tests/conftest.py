"""Every test runs with 8 simulated CPU devices so sharded code paths are exercised."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# a shell or job that exports JAX's multi-process variables must not turn every in-process
# run of the tests into one that waits for a coordinator
for _name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    os.environ.pop(_name, None)
