"""lmlab.objectives: pure loss functions, one module per family, each citing its docs/science.md section.

``lm`` (cross-entropy, label smoothing, z-loss, chunking), ``goldfish`` (masks), ``neftune``
(embedding noise), ``distill`` (KL / JSD distillation), ``preference`` (DPO, IPO, SimPO, LN-DPO,
ORPO), ``unlearning`` (NPO, gradient ascent). Contract: ``base.LossOutput``.
"""
