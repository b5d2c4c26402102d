"""The one definition of a detector's score: ``Scorer``, images -> scores, as an ``nn.Module``.

    images ─Normalize─▶ x ─victim encoder─▶ z ─ScoreTail(decoder, TestMask, ScoreKind)─▶ scores

The same module serves eager torch scoring (``TorchRunner``, ``Detector.score``), the exported ONNX graphs
(``detector.onnx`` is a ``Scorer``, ``decoder.onnx`` its ``tail``), the fused kernels' parity tests
(``kernel="reference"|"triton"`` replaces the tail's op chain) and the evaluation (``tail`` on cached
embeddings). At test time the mask is one seeded permutation shared by the batch, so it is a constant
(``TestMask`` buffers) and a sample's score does not depend on its batch.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from dede_rt.data.transforms import Normalization
from dede_rt.models.decoder import DeDeDecoder, draw_masks, patchify_images
from dede_rt.scoring.kinds import ScoreKind, SummedError, kind_class
from dede_rt.scoring.sse import MASK_SEED, TEST_MASK_RATIO, masked_sse

if TYPE_CHECKING:
    from dede_rt.bundle.detector import Detector

SCORE_KERNELS = ("torch", "reference", "triton")


class Normalize(nn.Module):
    """uint8 NHWC (``uint8_input``) or [0, 1] float NCHW pixels -> the encoder's normalized float NCHW."""

    def __init__(self, normalization: Normalization, uint8_input: bool = True) -> None:
        super().__init__()
        self.uint8_input = uint8_input
        self.register_buffer("mean", torch.tensor(normalization.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(normalization.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Same op order as ``Normalization.apply``, so eager and exported scores agree to the bit."""
        x = images.permute(0, 3, 1, 2).float() / 255.0 if self.uint8_input else images
        return (x - self.mean) / self.std


class TestMask(nn.Module):
    """The shared, seeded test mask as constant buffers: visible patch indices, un-shuffle order, masked flags."""

    def __init__(self, num_patches: int, mask_ratio: float = TEST_MASK_RATIO, seed: int = MASK_SEED) -> None:
        super().__init__()
        draw = draw_masks(1, num_patches, mask_ratio, torch.Generator().manual_seed(seed), shared=True)
        self.keep = draw.keep
        self.register_buffer("visible_index", draw.order[0, : draw.keep].clone())
        self.register_buffer("restore_index", draw.restore[0].clone())
        self.register_buffer("masked", draw.masked[0].clone())  # [T] bool


class ScoreTail(nn.Module):
    """(normalized images [N,3,H,W], embedding [N,D]) -> scores [N]: fixed-mask decode, masked SSE, score kind."""

    def __init__(self, decoder: DeDeDecoder, mask: TestMask, kind: ScoreKind | None = None) -> None:
        super().__init__()
        self.decoder = decoder.eval()
        self.mask = mask
        self.kind = kind if kind is not None else SummedError()

    def forward(self, images: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """The plain-op score: the reference the fused kernels are tested against."""
        pred = self.decoder.decode_fixed(images, embedding, self.mask.visible_index, self.mask.restore_index)
        target = patchify_images(images, self.decoder.config.patch_size)
        return self.kind(masked_sse(pred, target, self.mask.masked[None]), target)

    def fused(self, images_u8: torch.Tensor, x: torch.Tensor, embedding: torch.Tensor, ops: ModuleType,
              normalization: Normalization) -> torch.Tensor:
        """The same score with the mask-and-score tail as one fused op (``ops``: a kernels module).

        No visible patch: the head Linear is fused into the score too, so the [N, T, 3p²] reconstruction is
        never materialised.
        """
        d, m = self.decoder, self.mask
        mean, std, patch = normalization.mean, normalization.std, d.config.patch_size
        if m.keep == 0:
            hidden = d.decode_hidden(embedding)
            own = ops.mask_and_score_head(images_u8, hidden, d.head.weight, d.head.bias, None, mean, std, patch)
        else:
            pred = d.decode_fixed(x, embedding, m.visible_index, m.restore_index)
            own = ops.mask_and_score(images_u8, pred, m.masked[None], mean, std, patch)
        return self.kind(own, patchify_images(x, patch) if self.kind.needs_target else None)


def kernel_ops(kernel: str) -> ModuleType | None:
    """The kernels module behind a score kernel name (None for the plain torch op chain)."""
    if kernel == "torch":
        return None
    if kernel == "reference":
        from dede_rt.kernels import reference

        return reference
    if kernel == "triton":
        try:
            from dede_rt.kernels import triton_score
        except ImportError as exc:  # Triton is an optional (gpu/dev) dependency
            from dede_rt.errors import UserError

            raise UserError(f"score kernel 'triton' needs the triton package (pip install 'dede-rt[gpu]'): {exc}") \
                from None
        return triton_score
    from dede_rt.errors import UserError

    raise UserError(f"unknown score kernel {kernel!r}; choose one of {', '.join(SCORE_KERNELS)}")


class Scorer(nn.Module):
    """Pixels -> DeDe scores: normalize, victim encoder, fixed-mask decoder, masked error, score kind."""

    def __init__(self, *, encoder: nn.Module, decoder: DeDeDecoder, normalization: Normalization,
                 mask_ratio: float = TEST_MASK_RATIO, mask_seed: int = MASK_SEED, kind: ScoreKind | None = None,
                 uint8_input: bool = True, kernel: str = "torch", mask: TestMask | None = None,
                 folded: bool = False) -> None:
        super().__init__()
        self.normalization = normalization
        self.normalize = Normalize(normalization, uint8_input)
        self.encoder = encoder.eval()
        mask = mask if mask is not None else TestMask(decoder.config.num_patches, mask_ratio, mask_seed)
        self.tail = ScoreTail(decoder, mask, kind)
        if folded and mask.keep == 0:  # exact: block 1's image-independent work precomputed (scoring.folded)
            from dede_rt.scoring.folded import FoldedTail

            self.tail = FoldedTail(decoder, mask, kind)
        self.kernel = kernel
        self._ops = kernel_ops(kernel)
        if self._ops is not None and not uint8_input:
            raise ValueError("the fused score kernels read uint8 NHWC images")

    @classmethod
    def from_detector(cls, detector: Detector, *, uint8_input: bool = True, kernel: str = "torch",
                      exact: bool = False, folded: bool = False) -> Scorer:
        """The scorer of a detector bundle, with the score kind in the float32 form every backend runs.

        ``exact=True``: the score kind's float64 reference form instead (the relative score's prototype errors;
        ~10x its float32 cost, ~5 % of a torch detector's time, for differences of ~1e-6 relative).

        ``folded``: with no visible test patch, the decoder's first block runs with its constants precomputed
        (``scoring.folded.FoldedTail``; the same scores to float rounding): the exported test-time graphs use it.
        """
        mask = TestMask(detector.decoder.config.num_patches, detector.test_mask_ratio, detector.mask_seed)
        kind = kind_class(detector.score_kind).for_detector(detector, mask.masked, exact)
        return cls(encoder=detector.encoder, decoder=detector.decoder, normalization=detector.normalization,
                   kind=kind, uint8_input=uint8_input, kernel=kernel, mask=mask, folded=folded)

    @property
    def visible_patches(self) -> int:
        """Patches the decoder sees at the test ratio (0 in the reference 32 px / patch 4 setting)."""
        return self.tail.mask.keep

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Scores [N] for a batch (uint8 NHWC, or [0, 1] float NCHW when built with ``uint8_input=False``)."""
        x = self.normalize(images)
        embedding = self.encoder(x)
        if self._ops is None:
            return self.tail(x, embedding)
        return self.tail.fused(images, x, embedding, self._ops, self.normalization)

    @torch.no_grad()
    def score(self, images_u8: np.ndarray | torch.Tensor, batch_size: int = 256, progress: bool = False) -> np.ndarray:
        """Scores (float32 [N]) for uint8 NHWC images, batched; higher = more likely triggered."""
        from dede_rt.progress import track

        self.eval()
        device = self.normalize.mean.device
        out = np.empty(len(images_u8), np.float32)
        for start in track(range(0, len(images_u8), batch_size), "scoring", enabled=progress):
            batch = torch.as_tensor(images_u8[start : start + batch_size]).to(device)
            out[start : start + len(batch)] = self(batch).float().cpu().numpy()
        return out
