"""Shared test configurations."""
from pecft_jax.configs import base_config


def tiny_config(method="l2p", **method_options):
    c = base_config()
    c.progress_bar = False
    c.backbone.checkpoint = "random:ViT-Micro/4"
    c.dataset.name = "digits"
    c.scenario.num_tasks = 5
    c.scenario.class_order = "seed"
    c.scenario.seed = 3
    c.train.epochs = 1
    c.train.batch_size = 32
    c.train.learning_rate = 0.01
    c.train.checkpoint_every_steps = 3
    c.eval.batch_size = 64
    c.method.name = method
    if method == "l2p":
        c.method.pool_size = 6
        c.method.prompt_length = 2
        c.method.top_k = 2
    for key, value in method_options.items():
        c.method[key] = value
    return c


def task_spec(index, task_classes, num_classes=None):
    """The TaskSpec the loop would build for task ``index`` of ``task_classes``."""
    from pecft_jax.methods import TaskSpec
    task_classes = tuple(tuple(c) for c in task_classes)
    seen = tuple(c for classes in task_classes[:index + 1] for c in classes)
    return TaskSpec(index=index, classes=task_classes[index], seen_classes=seen,
                    num_classes=num_classes or len({c for cs in task_classes for c in cs}),
                    num_tasks=len(task_classes), task_classes=task_classes)
