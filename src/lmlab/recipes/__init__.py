"""Kinds of run, one module each (pretrain, sft, align, reward): what model, batches, objective, evaluation
and callbacks a run uses. The run lifecycle they share lives in ``lmlab.train.engine`` and ``lmlab.train.run``."""
