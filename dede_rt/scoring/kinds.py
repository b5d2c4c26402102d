"""Score kinds: what a detector reports from its reconstruction error. A registry, not ``if relative`` branches.

- ``summed``: the paper's score, the sum of squared error over the masked patches.
- ``relative``: the summed error minus the mean summed error of the ``k`` clean prototype reconstructions that
  fit the image best (``sse.relative_sse``): pixels no embedding redraws cancel out.

Every kind is an ``nn.Module`` ``(own_sse [N], target [N,T,P]) -> scores [N]`` whose constants (prototypes)
are buffers, so the same module runs eagerly, in exported graphs and after the fused kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from torch import nn

from dede_rt.models.decoder import DeDeDecoder
from dede_rt.scoring.sse import relative_sse

if TYPE_CHECKING:
    from dede_rt.bundle.detector import Detector

PROTOTYPES = 256  # clean reference embeddings the relative score compares against
RELATIVE_K = 32  # ... of which it averages the k that fit an image best (an eighth)


def prototype_indices(n: int, count: int = PROTOTYPES, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded subset of ``count`` of ``n`` reference images (all of them when n <= count)."""
    if n <= count:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, count, replace=False))


@torch.no_grad()
def prototype_reconstructions(decoder: DeDeDecoder, embeddings: torch.Tensor | np.ndarray,
                              batch_size: int = 512) -> torch.Tensor:
    """The decoder's reconstructions [K,T,P] of clean reference embeddings, from the embedding alone."""
    z = torch.as_tensor(np.ascontiguousarray(embeddings) if isinstance(embeddings, np.ndarray) else embeddings)
    z = z.to(next(decoder.parameters()).device)
    return torch.cat([decoder.decode_embedding(z[i : i + batch_size]) for i in range(0, len(z), batch_size)])


@dataclass(frozen=True)
class RelativeReference:
    """What the relative score compares against: prototype reconstructions [K,T,P] and how many to average."""

    prototypes: torch.Tensor
    k: int = RELATIVE_K

    @classmethod
    def from_embeddings(cls, decoder: DeDeDecoder, embeddings: torch.Tensor | np.ndarray,
                        k: int = RELATIVE_K) -> RelativeReference:
        """Decode clean reference embeddings once into the prototypes the score compares against."""
        return cls(prototype_reconstructions(decoder, embeddings), k)


class ScoreKind(nn.Module):
    """(own summed error [N], normalized target patches [N,T,P]) -> the detector's score [N]."""

    name: ClassVar[str]
    description: ClassVar[str]
    needs_target: ClassVar[bool] = True  # False: the kind reads only the summed error (no patchified target)

    @classmethod
    def for_detector(cls, detector: Detector, masked: torch.Tensor, exact: bool = True) -> ScoreKind:
        """This kind built from a detector's constants; ``masked`` [T]: the patches scored."""
        raise NotImplementedError

    def forward(self, own_sse: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: D102
        raise NotImplementedError


class SummedError(ScoreKind):
    """The paper's score: the summed error itself."""

    name = "summed"
    description = "sum of squared error over masked patches, normalized pixel space"
    needs_target = False

    @classmethod
    def for_detector(cls, detector: Detector, masked: torch.Tensor, exact: bool = True) -> SummedError:
        """No constants."""
        return cls()

    def forward(self, own_sse: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The summed error, unchanged."""
        return own_sse


class RelativeError(ScoreKind):
    """Summed error minus the mean error of the ``k`` best-fitting prototype reconstructions.

    ``exact``: the prototype errors in float64 (``sse.prototype_sse``), the reference form (tests, eval).
    ``exact=False``, what detectors run on every backend (torch too, ``Scorer.from_detector``): float32
    ``||x||² - 2x·r + ||r||²`` with the prototypes as one constant [T*P, K] matrix (MatMul + TopK, which every
    backend runs; TensorRT has no float64). Both are checked against each other.
    """

    name = "relative"
    description = ("sum of squared error over masked patches minus the mean such error of the k best-fitting "
                   "prototype reconstructions (scoring.sse.relative_sse)")

    def __init__(self, reference: RelativeReference, masked: torch.Tensor, exact: bool = True) -> None:
        super().__init__()
        self.k, self.exact = reference.k, exact
        if not 1 <= self.k <= len(reference.prototypes):
            raise ValueError(f"k must be in [1, {len(reference.prototypes)}] (the number of prototypes), got {self.k}")
        self.all_masked = bool(masked.all())
        self.register_buffer("keep", masked.float()[None, :, None].clone())  # only the scored patches count
        # Only the constants of the chosen form: the eager form's [K,T,P] prototypes, or the graph form's
        # [T*P, K] matrix and squared norms (an exported graph would otherwise carry both).
        if exact:
            prototypes = reference.prototypes.detach().cpu()
            if not self.all_masked:
                prototypes = prototypes * self.keep
            self.register_buffer("prototypes", prototypes.clone())
        else:
            flat = (reference.prototypes.detach().cpu().double() * masked.double()[None, :, None]).flatten(1)
            self.register_buffer("prototypes_t", flat.T.float().contiguous())  # [T*P, K]
            self.register_buffer("prototype_sq", flat.square().sum(1).float()[None])  # [1, K], exact in float64

    @classmethod
    def for_detector(cls, detector: Detector, masked: torch.Tensor, exact: bool = True) -> RelativeError:
        """The detector's prototype reconstructions (decoded once) restricted to the scored patches."""
        if detector.relative is None:
            from dede_rt.errors import UserError

            raise UserError("a relative-score detector needs its prototype embeddings (prototypes.npy)")
        return cls(detector.relative, masked, exact)

    def forward(self, own_sse: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Own error minus the mean of the k smallest prototype errors."""
        if self.exact:
            scored = target if self.all_masked else target * self.keep
            return relative_sse(own_sse, scored, self.prototypes.to(target.device), self.k)
        x = (target * self.keep).flatten(1)
        # ||x - r||^2 = ||x||^2 - 2 x.r + ||r||^2; the ranking needs only the last two (||x||^2 is per row).
        partial = self.prototype_sq - 2.0 * (x @ self.prototypes_t)
        nearest = torch.topk(partial, self.k, dim=1, largest=False).values.mean(dim=1)
        return own_sse - (nearest + x.square().sum(dim=1))


@dataclass(frozen=True)
class Standardization:
    """Mean and std of the summed and of the relative score on clean held-out images: the combined score's scales."""

    summed_mean: float
    summed_std: float
    relative_mean: float
    relative_std: float

    @classmethod
    def fit(cls, summed: np.ndarray, relative: np.ndarray) -> Standardization:
        """The scales of clean held-out scores of both kinds (float64 moments; a zero spread counts as 1e-12)."""
        s, r = np.asarray(summed, np.float64), np.asarray(relative, np.float64)
        return cls(float(s.mean()), max(float(s.std()), 1e-12), float(r.mean()), max(float(r.std()), 1e-12))

    def combine(self, summed: np.ndarray, relative: np.ndarray) -> np.ndarray:
        """z(summed) + z(relative) (float32) for arrays of both kinds' scores."""
        s, r = np.asarray(summed, np.float64), np.asarray(relative, np.float64)
        return ((s - self.summed_mean) / self.summed_std + (r - self.relative_mean) / self.relative_std).astype(np.float32)

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return {"summed_mean": self.summed_mean, "summed_std": self.summed_std, "relative_mean": self.relative_mean,
                "relative_std": self.relative_std}

    @classmethod
    def from_dict(cls, data: dict) -> Standardization:
        """From ``to_dict``'s form."""
        return cls(float(data["summed_mean"]), float(data["summed_std"]), float(data["relative_mean"]),
                   float(data["relative_std"]))


class CombinedError(ScoreKind):
    """z(summed) + z(relative): both kinds standardized on clean held-out images, then added.

    The summed error is strong on pasted patches a backdoored embedding does not redraw, and weak on blends and
    on images no embedding redraws (its control); the relative score is the reverse. On one scale (their clean
    spreads differ ~10x) neither swamps the other. The constants are the detector's ``Standardization``.
    """

    name = "combined"
    description = ("z(summed) + z(relative): the summed error and the relative score, each standardized with its "
                   "mean and std on the clean held-out images, added")

    def __init__(self, reference: RelativeReference, masked: torch.Tensor, standardization: Standardization,
                 exact: bool = True) -> None:
        super().__init__()
        self.relative = RelativeError(reference, masked, exact)
        s = standardization
        self.register_buffer("center", torch.tensor([s.summed_mean, s.relative_mean], dtype=torch.float32))
        self.register_buffer("inv_scale", torch.tensor([1.0 / s.summed_std, 1.0 / s.relative_std], dtype=torch.float32))

    @classmethod
    def for_detector(cls, detector: Detector, masked: torch.Tensor, exact: bool = True) -> CombinedError:
        """The detector's prototypes (as the relative kind) and its standardization."""
        from dede_rt.errors import UserError

        if detector.relative is None:
            raise UserError("a combined-score detector needs its prototype embeddings (prototypes.npy)")
        if detector.standardization is None:
            raise UserError("a combined-score detector needs its standardization (manifest score section)")
        return cls(detector.relative, masked, detector.standardization, exact)

    def forward(self, own_sse: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """z(own summed error) + z(relative score)."""
        relative = self.relative(own_sse, target)
        return (own_sse - self.center[0]) * self.inv_scale[0] + (relative - self.center[1]) * self.inv_scale[1]


SCORE_KINDS: dict[str, type[ScoreKind]] = {k.name: k for k in (SummedError, RelativeError, CombinedError)}
PROTOTYPE_KINDS = ("relative", "combined")  # the kinds whose bundles keep prototype embeddings
# What `dede-rt train` serves unless told otherwise: chosen by the rule of the README's "Choosing the score"
# (research.evaluation.report.score_choice) on every working victim built here. Bundles keep their own kind.
DEFAULT_SCORE = "relative"


def kind_class(name: str) -> type[ScoreKind]:
    """The score kind registered as ``name``."""
    from dede_rt.errors import UserError

    if name not in SCORE_KINDS:
        raise UserError(f"unknown score kind {name!r}; choose one of {', '.join(SCORE_KINDS)}")
    return SCORE_KINDS[name]
