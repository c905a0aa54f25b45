"""The embedded demo: Split MNIST (MNIST-5k, 5 tasks x 2 classes, class-incremental) on the
bundled ViT-Demo/7 pretrained on Fashion-MNIST.

    python -m pecft_jax.run --config experiments/configs/split_mnist.py:l2p --workdir /tmp/l2p
    (arg: l2p | finetune | finetune_head | joint)
"""
from pecft_jax.configs import base_config


def get_config(arg: str = "l2p"):
    c = base_config()
    c.backbone.checkpoint = "demo"
    c.dataset.name = "mnist5k"
    c.scenario.kind = "class"
    c.scenario.num_tasks = 5
    c.scenario.class_order = list(range(10))  # 0/1, 2/3, ... as Split MNIST is usually defined
    c.train.epochs = 3
    c.train.batch_size = 64
    c.train.checkpoint_every_steps = 100
    method = arg or "l2p"
    if method == "l2p":
        c.method.name = "l2p"
        c.method.pool_size = 10
        c.method.prompt_length = 5
        c.method.top_k = 5
        c.method.pull_constraint = 0.1
        c.method.batchwise_prompt = False
        c.method.diversity_penalty = False
        c.method.head_input = "prompt"
        c.train.learning_rate = 0.03 * c.train.batch_size / 256  # paper: 0.03 at batch 256? see README
    elif method in ("finetune", "finetune_full"):
        c.method.name = "finetune"
        c.method.mode = "full"
        c.train.learning_rate = 1e-4
    elif method == "finetune_head":
        c.method.name = "finetune"
        c.method.mode = "head"
        c.train.learning_rate = 1e-3
    elif method == "joint":
        c.method.name = "joint"
        c.method.mode = "full"
        c.train.learning_rate = 1e-4
    else:
        raise ValueError(f"unknown split_mnist variant {method!r}; use l2p, finetune, "
                         f"finetune_head or joint")
    return c
