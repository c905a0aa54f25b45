"""L2P (Wang et al., CVPR 2022).

    python -m pecft_jax.run --config experiments/configs/l2p.py:split_mnist --workdir DIR
    (arg: split_mnist [default] | cifar100 | cifar100_paper | 5datasets | imagenet_r |
     wordnet | vader | text_sequence)

``cifar100`` is the official code's setting: google-research/l2p @dd8836e,
``configs/cifar100_l2p.py`` (line numbers below; ViT-B/16 ImageNet-21k,
``imagenet21k/ViT-B_16.npz``, README.md:62):

* prompt pool M=10 (:99), prompt length 10 (:100), top-N 4 (:101), prompts prepended at
  the input, classifier on the mean of the prompt tokens' outputs (``vit_classifier='prompt'``
  :86), query = frozen [CLS] (``embedding_key='cls'`` :111), pull-constraint weight 1.0
  (:122), batch-wise prompt selection in training and test (:109), voted within each
  device's batch of 16 (``per_device_batch_size`` :25);
* prompts and keys ``U[0, 0.01)`` (flax ``nn.initializers.uniform()``, ``prompt_init`` :102,
  ``prompt_key_init`` :110; ``models/prompt.py``), head kernel and bias 0 (``models/vit.py``);
* Adam (0.9, 0.999, eps 1e-8: flax defaults), constant rate 0.03 per 256 examples (:38, :42)
  scaled by the global batch (``train_continual.py:637-639``): 16 per device x 8 devices
  (README.md:66) = 128, rate 0.015; 5 epochs (:45); gradient-norm clipping 1.0 (:41; the
  official code clips the global norm of all gradients, the frozen ViT's included, ours
  that of the trainable ones); optimiser reset per task (:34); logits outside the current
  task masked in training (:69); no weight decay (:44);
* data: classes in their own order (no shuffle); inputs in [0, 1]; training images squashed
  to 256 x 256, random-resized crop of area (0.05, 1) and aspect (0.75, 1.33) to 224 drawn as
  TF's ``sample_distorted_bounding_box`` draws it (``preprocess.py``,
  ``decode_and_random_resized_crop``: ``augment.crop_sampler='tf'``), flip;
  test images squashed to 256 x 256, central 224 crop (``input_pipeline.py``), all
  resized by TF's bilinear ``tf.image.resize`` (``dataset.resample='bilinear'``); tanh GELU
  (flax ``nn.gelu``); training batches cut from the task's examples shuffled and repeated
  over the epochs, so a batch may run into the next epoch, full batches only
  (``train.batches_cross_epochs``, ``train.drop_last``: clu's ``create_dataset`` shuffles,
  repeats, then batches with ``drop_remainder``, ``libml/input_pipeline.py:541-553``;
  ``train_continual.py:603-607`` takes ``epochs * (N // batch)`` steps, leaving the
  stream's last ``epochs * (N % batch)`` examples unread). Not reproduced:
  the JPEG re-encoding of training images, the dropped last partial test batch, the
  shuffle buffer of 10,000 examples (a full shuffle of a task up to that size; ours is
  always full).
* evaluation: the class-IL prediction is the argmax over all 100 classes, as the official
  ``eval_step`` takes it (``eval.class_il_classes='all'``): the columns of classes not
  learnt yet keep their zero logits (zero initialisation, zero gradient), so an example
  whose seen logits are all negative counts as wrong. The final row is the same either
  way (every class is seen); the earlier rows, and forgetting, can differ from the usual
  argmax over the seen classes (``'seen'``, the demo's). The code's forgetting takes each
  task's best over every evaluation, the last included (``train_continual.py:849-850``):
  ``metrics.nonnegative_forgetting`` in results.json (``metrics.forgetting`` is the
  standard one, which may be lower).

``cifar100_paper``: the same with the prompt values of the first official release (8cfb210,
December 2021; the PyTorch port l2p-pytorch keeps them): length 5, top-N 5, pull-constraint
0.1. That the paper's text states these was not verifiable offline.

``5datasets`` (``configs/five_datasets_l2p.py``): CIFAR-10, MNIST, SVHN, notMNIST,
Fashion-MNIST in the official order, pool 20 (:99), length 10, top-N 4, pull-constraint 0.5
(:122), the task prompt mask (``use_prompt_mask`` :104: training on task t uses pool
entries 4t..4t+3 for every example, ``train_continual.py:237-247``) and the copy of the
previous task's prompts into them (``shared_prompt_pool`` :107, ``train_continual.py:550-570``;
keys not copied, ``shared_prompt_key`` False :108), notMNIST trained on the first 80% of
its train split and tested on the last 20% (``libml/input_pipeline.py``, the not_mnist
branch: ``configs.NOT_MNIST``), the rest as ``cifar100``.

``imagenet_r``: the ``cifar100`` setting on Split ImageNet-R (the L2P paper has no
ImageNet-R run; DualPrompt's split, TFDS ``test[:80%]`` / ``test[80%:]``, is used).

Published (L2P paper, as the l2p-pytorch README's "Paper Results" quotes them; the paper
was not readable offline): Split CIFAR-100 average accuracy 83.83, forgetting 7.63;
5-datasets 81.14 / 4.64. REPRODUCING.md has the commands.
"""
from pecft_jax.configs import (NOT_MNIST, TEXT_BENCHMARKS, VIT_B16_IN21K, benchmark,
                               config_arg, official_protocol, with_method_defaults)

OFFICIAL_DEVICES = 8    # README.md:66: 8 V100 GPUs or 4 TPUs (8 cores)
PER_DEVICE_BATCH = 16   # configs/cifar100_l2p.py:25
ARGS = ("split_mnist", "cifar100", "cifar100_paper", "5datasets", "imagenet_r") + TEXT_BENCHMARKS


def get_config(arg: str = "split_mnist"):
    arg = config_arg("l2p", arg, ARGS)
    c = benchmark("cifar100" if arg == "cifar100_paper" else arg)
    m = c.method
    m.name = "l2p"  # L2P.Config's defaults: pool 10, length 5, top-N 5, pull 0.1
    c.train.optimizer = "adam"
    c.train.schedule = "constant"
    if arg == "split_mnist":
        # The demo ViT sees 16 patch tokens, not ViT-B's 196: N=5 prompts of length 5 would
        # put 25 prompt tokens beside 16 image tokens and the prompt-mean feature would be
        # mostly prompt. N=1 keeps L2P's prompt:image ratio closer to the paper's (25:196).
        # Measured on this demo (3 epochs, lr 0.03): N=5 25.5% / N=1 39.7% final accuracy.
        m.top_k = 1
        c.train.learning_rate = 0.03
        return with_method_defaults(c)
    if arg in TEXT_BENCHMARKS:
        # L2P has no official text setting: the method's defaults (above) on all-MiniLM-L6-v2
        # (25 prompt tokens beside 48-128 text tokens), the demo's rate for short runs.
        c.train.learning_rate = 0.03
        return with_method_defaults(c)
    official_protocol(c, VIT_B16_IN21K, gelu_exact=False, crop_scale=(0.05, 1.0),
                      resize_short=256, squash=True, crop_sampler="tf")
    c.train.batches_cross_epochs = True  # clu create_dataset: shuffle, repeat, then batch
    if arg == "5datasets":
        c.scenario.datasets = ["tfds:cifar10", "tfds:mnist", "tfds:svhn_cropped",
                               dict(NOT_MNIST), "tfds:fashion_mnist"]
    m.pool_size = 20 if arg == "5datasets" else 10
    m.prompt_length = 5 if arg == "cifar100_paper" else 10
    m.top_k = 5 if arg == "cifar100_paper" else 4
    m.pull_constraint = {"cifar100_paper": 0.1, "5datasets": 0.5}.get(arg, 1.0)
    m.use_prompt_mask = m.shared_prompt_pool = arg == "5datasets"
    m.batchwise_prompt = True
    m.batchwise_group = PER_DEVICE_BATCH
    m.prompt_init = m.key_init = "small_uniform"
    m.head_init = "zeros"
    c.eval.class_il_classes = "all"  # eval_step: the argmax over all classes' logits
    c.train.batch_size = PER_DEVICE_BATCH * OFFICIAL_DEVICES
    c.train.learning_rate = 0.03 * c.train.batch_size / 256
    c.train.epochs = 5
    c.train.grad_clip_norm = 1.0
    return with_method_defaults(c)
