"""experiments/compare_methods.py: run names and the seed aggregation."""
import importlib.util
import os

from helpers import ROOT


def _module():
    spec = importlib.util.spec_from_file_location(
        "compare_methods", os.path.join(ROOT, "experiments", "compare_methods.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_workdir_names_differ_by_overrides_and_seed():
    name = _module().workdir_name
    base = name("l2p.py:split_mnist")
    assert base == "l2p_split_mnist"
    other = name("l2p.py:split_mnist", ["--config.seed=2"])
    assert other != base and other == name("l2p.py:split_mnist", ["--config.seed=2"])
    assert name("l2p.py:split_mnist", ["--config.seed=3"]) != other
    assert name("l2p.py:split_mnist", [], 1) == "l2p_split_mnist_seed1"


def test_rows_give_mean_and_sample_std_over_seeds():
    module = _module()
    assert module.fmt([1.0, 2.0, 3.0]) == "2.00 +- 1.00"
    assert module.fmt([4.0]) == "4.00" and module.fmt([None]) == "n/a"
    run = lambda acc: {"method": "m", "metrics": {"average_accuracy": acc, "forgetting": 1.0},
                       "trainable_params": 5, "state_size": 7, "seconds_per_task": [1.0, 3.0]}
    line = module.table([("m.py:x", [run(10.0), run(20.0)])]).splitlines()[-1]
    assert "| 15.00 +- 7.07 |" in line and line.endswith("| 2 |") and "| 7 |" in line
