"""DeDe's score: ``Scorer`` (images -> scores), its score kinds, and the squared-error arithmetic."""

from dede_rt.scoring.kinds import (DEFAULT_SCORE, PROTOTYPE_KINDS, PROTOTYPES, RELATIVE_K, SCORE_KINDS, CombinedError,
                                   RelativeError, RelativeReference, ScoreKind, Standardization, SummedError,
                                   kind_class, prototype_indices, prototype_reconstructions)
from dede_rt.scoring.scorer import SCORE_KERNELS, Normalize, Scorer, ScoreTail, TestMask, kernel_ops
from dede_rt.scoring.sse import (MASK_SEED, TEST_MASK_RATIO, masked_sse, prototype_sse, reconstruction_loss,
                                 relative_sse, trimmed_sse)

__all__ = [
    "CombinedError",
    "DEFAULT_SCORE",
    "MASK_SEED",
    "Normalize",
    "PROTOTYPES",
    "PROTOTYPE_KINDS",
    "RELATIVE_K",
    "RelativeError",
    "RelativeReference",
    "SCORE_KERNELS",
    "SCORE_KINDS",
    "ScoreKind",
    "ScoreTail",
    "Scorer",
    "Standardization",
    "SummedError",
    "TEST_MASK_RATIO",
    "TestMask",
    "kernel_ops",
    "kind_class",
    "masked_sse",
    "prototype_indices",
    "prototype_reconstructions",
    "prototype_sse",
    "reconstruction_loss",
    "relative_sse",
    "trimmed_sse",
]
