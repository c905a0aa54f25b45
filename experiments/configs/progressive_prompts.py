"""Progressive Prompts (Razdaibiedina et al., ICLR 2023), on text.

    python -m pecft_jax.run --workdir DIR \
        --config experiments/configs/progressive_prompts.py:wordnet
    arg: wordnet [default] | vader | text_sequence | bert_order4 | bert_order5 | bert_order6

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

``bert_order4`` | ``bert_order5`` | ``bert_order6``: the official BERT script
(``BERT_codebase/run_prog_prompts.sh``): bert-base-uncased (a Hugging Face folder at
``configs.BERT_BASE_UNCASED``), the task orders of its lines 14-20 / 23-29 / 32-38 over AG
News, Yelp, Amazon, Yahoo! Answers and DBpedia (Zhang et al.'s CSVs, which you provide under
``data/<name>_csv``: nothing is downloaded), 2,000 training examples per class
(``--select_k_per_class``; here also at most 2,000 test examples per class, where the
official code evaluates 300), texts of 450 tokens after [CLS] (``--seq_len``), prompts of
10 tokens, no MLP (the script passes no ``--prefix_MLP``), ``transformers.AdamW``
(``model_utils.py:22,176``, adapter-transformers 3.0.1 / transformers 4.x:
``train.optimizer='transformers_adamw'``, which adds epsilon to the root of the uncorrected
second moment and decays the stepped parameters, as that class does) at lr 3e-5, weight
decay 0.01, epsilon 1e-6 (its default), 1,000 warm-up steps then constant
(``get_constant_schedule_with_warmup``, ``model_utils.py:172-177``), one optimizer for the
whole run (``train.optimizer_scope='run'``, below), batch 8 (``train_cl2.py:135-140``),
50 epochs (``--num_epochs``), an epoch's last partial batch kept as the official loader
keeps it (``dataset_utils.py:178``; ``train.drop_last=False``), every epoch in the one order
the examples were shuffled into (``dataset.shuffle(seed)`` and ``select_subset_ds``'s
``np.random.shuffle``, ``dataset_utils.py:190-201,256``, then a loader without
``shuffle``: ``train.reshuffle_each_epoch=False``; the order itself is this library's
draw), without the official early stopping on a validation split.
The text of each row is what ``dataset_utils.py`` feeds BERT for the script's task names
(``TEXT``): AG News' title and description, Yelp's review, only the content of Amazon's and
DBpedia's rows (``task_to_keys``: ``("content", None)``, the title dropped), and Yahoo!
Answers' title, question and best answer joined by ``[SEP]`` (its
``yahoo_answers_topics`` branch; the official code also drops the rows its ``good_id``
files list as empty, which are not reproduced; here a row whose chosen columns are all
empty is left out: pandas reads such cells as missing values, which the official code
does not handle). Read the task-IL accuracy matrix: that is the paper's protocol.

The official optimiser is built once for the whole sequence (``model_utils.py:172-177``,
never rebuilt in ``continual_training``); ``train.optimizer_scope='run'`` reproduces it:
(a) the warm-up runs once, over the run's first 1,000 steps, and (b) a later task's prompt
-- rows of BERT's one word-embedding tensor, with one Adam step count -- starts with zero
moments (its rows never had a gradient: ``model_utils.py:411-415`` zeroes every other row's)
at the run's step count, i.e. without bias correction of its first steps: for a steady
gradient its updates reach about 6x the nominal size after ten steps and shrink back over
about a thousand. The heads, tensors of their own, start their Adam counts with their task
(``ProgressivePrompts.run_long_groups``). The text benchmarks above keep a fresh optimizer
per task (no warm-up to run once; their README figures were measured so).

Prompt initialisation: token 1 of each prompt copies [CLS], the others a random vocabulary
row, as ``model_utils.py:197-208``; there task t draws from the vocabulary grown by the
earlier prompts' rows (``N`` is read after they were added), so with a chance of
``t L / (V + t L)`` (under 0.3% for the BERT orders) a token copies an earlier prompt's
initial row; here the draws are over the ``V`` vocabulary rows only.

The T5 variant (prompts before the input, text-to-text generation) is out of scope: the
library's text backbone is an encoder with classification heads.
"""
from pecft_jax.configs import (BERT_BASE_UNCASED, TEXT_BENCHMARKS, base_config, benchmark,
                               config_arg, text_csv_sequence, with_method_defaults)

# run_prog_prompts.sh (the dataset names are the CSV folders', configs.TEXT_CSV_DATASETS)
ORDERS = {
    "bert_order4": ("ag_news", "yelp_review_full", "amazon_review_full", "yahoo_answers",
                    "dbpedia"),                                                   # :14-20
    "bert_order5": ("yelp_review_full", "yahoo_answers", "amazon_review_full", "dbpedia",
                    "ag_news"),                                                   # :23-29
    "bert_order6": ("dbpedia", "yahoo_answers", "ag_news", "amazon_review_full",
                    "yelp_review_full"),                                          # :32-38
}

# the text dataset_utils.py gives BERT for the script's task names: 'amazon' and 'dbpedia'
# read the CSVs with task_to_keys ("content", None) -- column 2, the title (1) dropped --
# and 'yahoo_answers_topics' joins title, content and answer with '[SEP]' (its
# preprocess_function branch; Hugging Face's copy of the same CSV's columns 1-3); ag_news
# (title + description) and yelp (one text column) read every column, the default
TEXT = {"amazon_review_full": {"csv_columns": (2,)},
        "dbpedia": {"csv_columns": (2,)},
        "yahoo_answers": {"csv_columns": (1, 2, 3), "csv_join": "[SEP]"}}


def get_config(arg: str = "wordnet"):
    arg = config_arg("progressive_prompts", arg, TEXT_BENCHMARKS + tuple(ORDERS))
    c = benchmark(arg) if arg in TEXT_BENCHMARKS else base_config()
    c.method.name = "progressive_prompts"
    c.train.optimizer = "adamw"
    c.train.weight_decay = 0.01
    c.train.schedule = "constant"
    if arg in TEXT_BENCHMARKS:
        c.train.learning_rate = 1e-3
        return with_method_defaults(c)
    c.benchmark = arg
    c.backbone.checkpoint = BERT_BASE_UNCASED
    c.backbone.max_length = 451          # --seq_len 450 text tokens after [CLS]
    text_csv_sequence(c, ORDERS[arg], TEXT)
    c.dataset.max_per_class = 2000       # --select_k_per_class 2000
    c.scenario.class_order = None
    c.method.prompt_length = 10          # --prefix_len 10
    c.method.residual_mlp = False        # no --prefix_MLP in the script
    c.train.learning_rate = 3e-5         # --lr 3e-5
    c.train.warmup_steps = 1000          # get_constant_schedule_with_warmup(opt, 1000)
    c.train.optimizer = "transformers_adamw"  # from transformers import AdamW (:22, :176)
    c.train.eps = 1e-6                   # transformers.AdamW's default (model_utils.py:176)
    c.train.optimizer_scope = "run"      # built once in __init__ (:172-177), never reset
    c.train.batch_size = 8               # --batch_size 8
    c.train.epochs = 50                  # --num_epochs 50
    c.train.drop_last = False            # dataset_utils.py:178's DataLoader keeps it
    c.train.reshuffle_each_epoch = False  # ... and never reshuffles (shuffled once, :256)
    c.train.checkpoint_every_steps = 1000
    c.eval.batch_size = 64
    return with_method_defaults(c)
