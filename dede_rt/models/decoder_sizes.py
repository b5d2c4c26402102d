"""Decoder shapes by name (torch-free, so the CLI and the bench can name them without importing torch)."""

from __future__ import annotations

from dede_rt.errors import UserError

# "reference" is the paper's CIFAR decoder (the DecoderConfig defaults). "small" is the default of `dede-rt train`:
# at the test mask ratio the MAE-encoder blocks see only the embedding token, so the test-time cost is the decoder
# blocks over 65 tokens, ~25 M MACs for small against ~111 M (32 px). Measured (README "Decoder size"): the
# detector keeps 0.92 (FP32) / 0.85 (INT8) of its own encoder's ORT throughput against 0.77 / 0.70 with the
# reference shape, at AUROCs within the seed spread (eval victims) or 0.02 (demo victim) of it.
DECODER_SIZES: dict[str, dict[str, int]] = {
    "reference": {"dim": 192, "heads": 3, "encoder_depth": 12, "decoder_depth": 4},
    "small": {"dim": 128, "heads": 4, "encoder_depth": 2, "decoder_depth": 2},
}
DEFAULT_DECODER_SIZE = "small"


def decoder_shape(size: str = DEFAULT_DECODER_SIZE, **overrides) -> dict:
    """The named decoder shape (``DECODER_SIZES``) with the given fields replaced (``None`` keeps the size's)."""
    if size not in DECODER_SIZES:
        raise UserError(f"unknown decoder size {size!r}; choose one of {', '.join(DECODER_SIZES)}")
    return {**DECODER_SIZES[size], **{k: v for k, v in overrides.items() if v is not None}}


def size_name(shape: dict) -> str:
    """The ``DECODER_SIZES`` name whose fields ``shape`` has, else "custom"."""
    return next((name for name, fields in DECODER_SIZES.items()
                 if all(shape.get(k) == v for k, v in fields.items())), "custom")
