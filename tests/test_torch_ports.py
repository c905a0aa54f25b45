"""The PyTorch ports that ``experiments/benchmark_step.py`` times at a later task
(``GROWS_WITH_TASK``): their step at task ``t`` is the official layout of task ``t``.

PyTorch is not a pecft_jax dependency: without it these tests are skipped (CI); run them
with torch on the path (``PYTHONPATH=<a torch --target dir> pytest tests/test_torch_ports.py``).
"""
import argparse
import importlib.util
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from helpers import ROOT  # noqa: E402
from tests.test_text import needs_minilm  # noqa: E402


def _bench():
    sys.path.insert(0, os.path.join(ROOT, "experiments"))  # torch_ports, as the worker does
    spec = importlib.util.spec_from_file_location(
        "benchmark_step", os.path.join(ROOT, "experiments", "benchmark_step.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    import torch_ports
    return bench, torch_ports


def _port(method: str, arch: str, task: int, batch: int = 4, settings=()):
    """The port of ``method``'s step at ``task``, built as the benchmark's torch worker
    builds it: ``(port, step inputs)``."""
    bench, torch_ports = _bench()
    torch.manual_seed(0)
    args = argparse.Namespace(method=method, arch=arch, dtype="float32", attention="einsum",
                              demo_settings=True, set=list(settings))
    method_obj, cfg = bench.make_method(args)
    inputs, labels = bench.inputs(cfg, batch, task)
    if bench.modality(method) == "text":
        model = torch_ports.Bert(cfg)
        inputs = {k: torch.from_numpy(v).long() for k, v in inputs.items()}
    else:
        model = torch_ports.ViT(cfg)
        inputs = torch.from_numpy(inputs).permute(0, 3, 1, 2).contiguous()
    mask = torch.full((bench.NUM_CLASSES,), float("-inf"))
    mask[list(bench.task_classes()[task])] = 0
    step = torch_ports.Step(method=method_obj, cfg=cfg, model=model.requires_grad_(False),
                            inputs=inputs, labels=torch.from_numpy(labels).long(), mask=mask,
                            num_classes=bench.NUM_CLASSES, task=task)
    return torch_ports.PORTS[method](step), step


def _forward_flops(port) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        port.loss()
    return counter.get_total_flops()


def _trains_its_parameters(port) -> float:
    """The loss's value, after checking that a backward pass reaches every trained tensor."""
    loss = port.loss()
    loss.backward()
    assert all(p.requires_grad and p.grad is not None for p in port.params)
    assert np.isfinite(loss.item())
    return loss.item()


@pytest.mark.parametrize("method", ["sd_lora", "o_lora"])
def test_lora_ports_run_the_earlier_tasks_branches_beside_the_new_one(method):
    first, _ = _port(method, "ViT-Micro/4", 0, settings=["rank=2"])
    later, _ = _port(method, "ViT-Micro/4", 2, settings=["rank=2"])
    _trains_its_parameters(first), _trains_its_parameters(later)
    # the earlier tasks' factors are frozen: task 2 trains the same factors and head as task
    # 0 (SD-LoRA: and the earlier tasks' magnitudes, one scalar each)
    sizes = lambda port: sorted(p.numel() for p in port.params)  # noqa: E731
    expected = sorted(sizes(first) + ([2] if method == "sd_lora" else []))
    assert sizes(later) == expected
    # ... but run beside the new branch at every adapted projection
    assert _forward_flops(later) > _forward_flops(first)


@needs_minilm
def test_progressive_prompts_port_lays_out_prompts_zero_to_t():
    """Task ``t``'s sequence: the text without [CLS], then prompts ``0..t`` at the official
    position ids (those of ``prompt_positions``), the head at ``P_t``'s first token."""
    from pecft_jax.methods.progressive_prompts import prompt_positions
    for task in (0, 2):
        port, step = _port("progressive_prompts", "BERT-Tiny6", task)
        seen = []
        embed = step.model.embed

        def recording(vectors, positions, embed=embed):
            seen.append((vectors.shape, positions))
            return embed(vectors, positions)
        step.model.embed = recording
        _trains_its_parameters(port)
        n = step.inputs["token_ids"].shape[1] - 1  # the text without its [CLS]
        length = step.method.config.prompt_length
        (shape, positions), = seen
        assert shape[1] == n + (task + 1) * length
        expected = np.concatenate([np.arange(1, n + 1),
                                   prompt_positions(n, task + 1, length).ravel()])
        np.testing.assert_array_equal(positions.numpy(), expected)
        # one prompt learns (with its MLP and head), whatever the task
        assert sum(p.numel() for p in port.params if p.shape == (length, step.d)) == \
            length * step.d
