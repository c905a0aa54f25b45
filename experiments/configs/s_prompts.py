"""S-Prompts (S-iPrompts, Wang et al., NeurIPS 2022): domain-incremental learning.

    python -m pecft_jax.run --config experiments/configs/s_prompts.py:domain_mnist --workdir DIR
    (arg: domain_mnist [default] | domainnet)

Official-code setting (iamwangyabin/S-Prompts, configs/domainnet_slip.json with the
ViT ``SiNet``): per domain 10 prompt tokens at the input and a linear classifier; SGD
momentum 0.9, lr 0.01, cosine over 10 epochs per domain, batch 128, weight decay 5e-4
(first domain) / 2e-4 (later); k-means with 5 centroids per domain on the normalised frozen
[CLS] features; the nearest centroid (L1 distance) picks the domain.

``domainnet``: DomainNet's six domains in the official order (clipart, infograph, painting,
quickdraw, real, sketch; 345 classes each) from TFDS ``domainnet/<domain>``, which must be
prepared beforehand in ``dataset.data_dir`` (``tfds build domainnet
--file_format=array_record``; nothing is downloaded at run time), on ViT-B/16 weights at
``backbone.checkpoint``. The paper's other benchmarks (CDDB-Hard, CORe50) are not in TFDS:
they need a local reader.
"""
from pecft_jax.configs import benchmark, with_method_defaults

DOMAINNET = ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]


def get_config(arg: str = "domain_mnist"):
    arg = arg or "domain_mnist"
    if arg == "domainnet":
        c = benchmark("cifar100")  # ViT-B/16 at 224, augmentation, TFDS data_dir
        c.dataset.name = "tfds:domainnet"
        c.scenario.kind = "domain"
        c.scenario.domains = [f"tfds:domainnet/{d}" for d in DOMAINNET]
        c.scenario.num_tasks = len(DOMAINNET)
        c.scenario.class_order = "identity"
        c.train.batch_size = 128
        c.train.epochs = 10
        c.train.schedule = "cosine"
        c.benchmark = "domainnet"
    elif arg == "domain_mnist":
        c = benchmark("domain_mnist")
        c.train.schedule = "cosine"
    else:
        raise ValueError(f"s_prompts config: unknown benchmark {arg!r}; use 'domain_mnist' or "
                         f"'domainnet'")
    c.method.name = "s_prompts"  # SPrompts.Config's defaults are the official values above
    c.train.optimizer = "sgd"
    c.train.momentum = 0.9
    # the paper's 0.01 for ViT-B/16; the small demo backbone with 3 epochs per domain
    # needs a larger step (0.01: 54.0% average accuracy, 0.1: 64.5%, 0.3: 62.7%)
    c.train.learning_rate = 0.01 if c.benchmark == "domainnet" else 0.1
    return with_method_defaults(c)
