"""Sequential fine-tuning (lower bound) and joint training (upper bound).

    python -m pecft_jax.run --config experiments/configs/finetune.py:split_mnist --workdir DIR
    arg: <benchmark>[,<mode>][,joint]   e.g. split_mnist,head  or  split_mnist,full,joint
    benchmark: split_mnist | cifar100 | imagenet_r | wordnet | vader | text_sequence
    mode: full [default] | head | lora | adapter | ssf | prompt
    joint: all tasks' data as one task (scenario.joint=True)

Where the values come from: no paper defines these baselines' hyper-parameters; they are
this project's untuned choices, the same on every benchmark so the bounds are comparable:
Adam, a rate of 1e-4 for full fine-tuning (every backbone weight moves, so a small step)
and 1e-3 for the parameter-efficient modes and the head; the benchmark's own epochs
(``configs.benchmark``: 3 on the demos, 2 on the text benchmarks), and 5 on the ViT-B/16
benchmarks, as L2P's and DualPrompt's official Split CIFAR-100 configs (see l2p.py,
dualprompt.py).
"""
from pecft_jax.configs import TEXT_BENCHMARKS, benchmark, with_method_defaults


def get_config(arg: str = "split_mnist"):
    parts = (arg or "split_mnist").split(",")
    c = benchmark(parts[0])
    c.method.name = "finetune"
    c.scenario.joint = "joint" in parts[1:]
    modes = [p for p in parts[1:] if p != "joint"]
    c.method.mode = modes[0] if modes else "full"
    c.train.optimizer = "adam"
    # full fine-tuning moves the whole backbone: a small step; the others a larger one
    c.train.learning_rate = 1e-4 if c.method.mode == "full" else 1e-3
    if c.benchmark not in ("split_mnist",) + TEXT_BENCHMARKS:
        c.train.epochs = 5
    return with_method_defaults(c)
