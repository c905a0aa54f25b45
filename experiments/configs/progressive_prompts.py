"""Progressive Prompts (Razdaibiedina et al., ICLR 2023), on text.

    python -m pecft_jax.run --config experiments/configs/progressive_prompts.py:wordnet --workdir DIR
    arg: wordnet [default] | vader | text_sequence

The method's values are the official BERT code's (arazd/ProgressivePrompts @01572d6,
``BERT_codebase``): prompts of 10 tokens per task (``--prefix_len 10``,
``run_prog_prompts.sh``), the residual MLP of bottleneck 800 (``--bottleneck_size``
default; the paper's reparameterisation, which the shipped script leaves off), one
two-layer tanh head per task with dropout 0.1, the encoder's dropout on while training.
The optimiser is the official one -- AdamW, weight decay 0.01 (``model_utils.py:172-177``)
-- except its rate and length: the official 3e-5 with 50 epochs of batch 8 over 2,000
examples per class (tens of thousands of steps a task) would barely move a prompt in the
~30 steps a task of these CPU-sized benchmarks has (2 epochs of batch 32), so the rate is
1e-3 (not tuned beyond that choice) and there is no warm-up (the official 1,000 steps
exceed a whole run here).

The paper's benchmarks (AG News, Yelp, Amazon, Yahoo, DBpedia; BERT-base and T5) cannot be
had offline; these configs run on the offline text benchmarks with all-MiniLM-L6-v2. The T5
variant (prompts before the input, text-to-text generation) is out of scope: the library's
text backbone is an encoder with classification heads.
"""
from pecft_jax.configs import TEXT_BENCHMARKS, benchmark, config_arg, with_method_defaults


def get_config(arg: str = "wordnet"):
    arg = config_arg("progressive_prompts", arg, TEXT_BENCHMARKS)
    c = benchmark(arg)
    c.method.name = "progressive_prompts"
    c.train.optimizer = "adamw"
    c.train.weight_decay = 0.01
    c.train.schedule = "constant"
    c.train.learning_rate = 1e-3
    return with_method_defaults(c)
