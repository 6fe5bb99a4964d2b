"""Training losses of the drafters: DSpark / DFlash block losses and the Eagle3 step loss.

The vocabulary-sized terms (CE, L1 between draft and target distributions, soft cross-entropy) come in a
readable fp32 reference, a memory-lean chunked PyTorch path and Triton kernels, picked with ``impl``; the
combinations (position weights, cross-rank normalisation, diagnostics) are plain PyTorch on per-row values.
"""

from specdec.losses.dspark import DSparkLoss, dspark_loss, global_weight_scale, position_weights
from specdec.losses.eagle3 import Eagle3Loss, eagle3_loss
from specdec.losses.vocab_terms import IMPLS, Impl, dspark_vocab_terms, resolve_impl, soft_cross_entropy

__all__ = [
    "IMPLS",
    "DSparkLoss",
    "Eagle3Loss",
    "Impl",
    "dspark_loss",
    "dspark_vocab_terms",
    "eagle3_loss",
    "global_weight_scale",
    "position_weights",
    "resolve_impl",
    "soft_cross_entropy",
]
