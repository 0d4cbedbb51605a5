"""Supervised fine-tuning on prompt/response or chat data (``mtnlg finetune``).

``data`` reads and checks JSONL examples and tokenizes them with a loss mask,
``template`` is the chat template stored with a fine-tuned model, ``pack``
turns examples into trainer rows (packing with per-example attention, or
padding), ``init`` loads the starting model, and ``run`` is the command,
which hands everything to the same ``mtnlg.train.trainer.Trainer`` as
pretraining.  See docs/finetune.md.
"""
