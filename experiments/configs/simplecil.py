"""SimpleCIL (Zhou et al., "Revisiting Class-Incremental Learning with Pre-Trained Models",
IJCV 2024).

    python -m pecft_jax.run --config experiments/configs/simplecil.py:split_mnist --workdir DIR
    (arg: split_mnist [default] | domain_mnist | cifar100 | imagenet_r | wordnet | vader |
     text_sequence)

No gradient step at all (``train.*`` is unused): after each task the mean frozen [CLS]
feature (after the final LayerNorm) of every new class's un-augmented training images
becomes its prototype; prediction is the most cosine-similar prototype of a seen class.
SimpleCIL has no hyper-parameter; what a config fixes is the data and the backbone. On the
text benchmarks the prototypes are all-MiniLM-L6-v2's mean-pooled sentence embeddings (the
representation the model was trained to give).

Paper setting (official zhoudw-zdw/RevisitingCIL ``exps/simplecil/cifar224_5_5_vit-b_simplecil.json``
and ``imagenetr_5_5_...``; LAMDA-PILOT ``exps/simplecil.json`` / ``simplecil_inr.json``):

* backbone ViT-B/16 ImageNet-21k (official: timm ``vit_base_patch16_224_in21k``, the augreg
  weights, no pre-logits layer; PILOT uses the in1k-fine-tuned ``vit_base_patch16_224``);
* inputs ``ToTensor()`` without normalisation, so pixels in [0, 1]: ``backbone.mean=(0,)``,
  ``backbone.std=(1,)``; images as the official ``utils/data.py`` ``build_transform`` test
  transform leaves them, ``Resize(256, interpolation=3)`` (bicubic) + ``CenterCrop(224)``,
  torchvision on PIL images (``dataset.resample='pil_bicubic'``, ``eval.resize_short=256``);
* data: ImageNet-R is TFDS ``imagenet_r`` split 80/20 here, not the authors' train/test
  folders;
* splits: the official configs are B0 Inc5; these benchmarks are PILOT's B0 Inc10
  (CIFAR-100, 10 tasks) and B0 Inc20 (ImageNet-R, 10 tasks), class order
  ``np.random.seed(1993); np.random.permutation`` as the official data manager
  (``scenario.class_order='pycil'``);
* the prototype pass batch (official 128) is ``eval.batch_size``; it does not change the
  result.

Official logs (B0 Inc5, ViT-B/16 in21k): CIFAR-100 last 81.28 / average 87.57; ImageNet-R
last 54.55 / average 62.57. "last" is PyCIL's top-1 over every test image of the classes
seen, "average" its mean over the steps: compare with ``metrics.pooled_accuracy`` and
``pooled_incremental_accuracy`` (``average_accuracy`` averages the tasks' accuracies
instead).
"""
from pecft_jax.configs import (VIT_B16_AUGREG_IN21K, benchmark, pycil_protocol,
                               with_method_defaults)


def get_config(arg: str = "split_mnist"):
    c = benchmark(arg or "split_mnist")
    c.method.name = "simplecil"
    if c.benchmark in ("cifar100", "imagenet_r"):
        pycil_protocol(c, VIT_B16_AUGREG_IN21K)
        c.eval.batch_size = 128
    c.augment.enabled = False  # nothing is trained: no augmented batch is ever drawn
    return with_method_defaults(c)
