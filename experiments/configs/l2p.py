"""L2P (Wang et al., CVPR 2022).

    python -m pecft_jax.run --config experiments/configs/l2p.py:split_mnist --workdir DIR
    (arg: split_mnist [default] | cifar100 | imagenet_r | 5datasets)

Paper / official-code setting (Split CIFAR-100, ViT-B/16 ImageNet-21k): pool M=10, prompt
length 5, top-N=5, prompts prepended at the input, classifier on the mean of the prompt
tokens' outputs, key-matching weight 0.1, batch-wise prompt selection, Adam
(b1=0.9, b2=0.999), constant learning rate 0.03 scaled by batch/256, batch 128, 5 epochs,
logits of classes outside the current task masked while training.
"""
from pecft_jax.configs import benchmark, with_method_defaults


def get_config(arg: str = "split_mnist"):
    c = benchmark(arg or "split_mnist")
    c.method.name = "l2p"  # L2P.Config's defaults are the paper's pool, prompts and loss
    c.train.optimizer = "adam"
    c.train.schedule = "constant"
    if c.benchmark == "split_mnist":
        # The demo ViT sees 16 patch tokens, not ViT-B's 196: N=5 prompts of length 5 would
        # put 25 prompt tokens beside 16 image tokens and the prompt-mean feature would be
        # mostly prompt. N=1 keeps L2P's prompt:image ratio closer to the paper's (25:196).
        # Measured on this demo (3 epochs, lr 0.03): N=5 25.5% / N=1 39.7% final accuracy.
        c.method.top_k = 1
        c.train.learning_rate = 0.03
    else:
        c.method.batchwise_prompt = True
        c.train.epochs = 5
        c.train.learning_rate = 0.03 * c.train.batch_size / 256
    return with_method_defaults(c)
