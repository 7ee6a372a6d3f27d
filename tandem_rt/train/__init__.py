"""Training and evaluation pipeline: tokenizer, data, pretraining, tandem training, router, evaluation.

Import the submodules directly (``tandem_rt.train.data``, ``tandem_rt.train.tandem``, ...).
"""
