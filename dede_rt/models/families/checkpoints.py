"""Checkpoint key layouts of the SSL / CLIP repositories: find the encoder's weights inside what they publish.

The same torchvision or timm backbone is saved under a different prefix by every training repository:
MoCo v2 ``module.encoder_q.``, MoCo v3 ``module.base_encoder.``, SimCLR/BYOL ports ``backbone.`` or
``module.``, DINO ``student`` / ``teacher`` sub-dicts with ``module.backbone.`` / ``backbone.``, OpenCLIP
``visual.`` (``model.visual.`` in fine-tuning repos). ``locate_weights`` picks the prefix under which the
model's own keys are found, preferring the query / online / teacher copy when a checkpoint holds two.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from dede_rt.errors import UserError

# In order of preference when two prefixes hold the same backbone (MoCo's encoder_q beside encoder_k, MoCo
# v3's base_encoder beside momentum_encoder): the encoder a repository's own linear evaluation reads.
KNOWN_PREFIXES = (
    "module.encoder_q.", "encoder_q.", "module.base_encoder.", "base_encoder.", "module.backbone.", "backbone.",
    "module.online_network.", "online_network.", "module.encoder.", "encoder.", "student.", "teacher.",
    "model.visual.", "module.visual.", "visual.", "model.", "module.", "",
)
# Top-level entries that wrap the weights; DINO saves both networks and evaluates its teacher.
WRAPPERS = ("state_dict", "model", "teacher", "student", "network", "params")


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint file's top-level dict: safetensors, or torch.load with ``weights_only`` (never unpickles code)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix, in one line
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({first})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a state dict or a checkpoint dict, found {type(obj).__name__}")
    return obj


def tensor_state(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The flat tensor dict inside a checkpoint (``state_dict`` / ``model`` / DINO's ``teacher`` ...)."""
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint
    for key in WRAPPERS:
        inner = checkpoint.get(key)
        if isinstance(inner, dict) and inner:
            return tensor_state(inner)
    raise UserError(f"checkpoint holds no tensor state dict (top-level keys: {', '.join(list(checkpoint)[:6])})")


def locate_weights(state: dict[str, torch.Tensor], expected: Iterable[str]) -> tuple[dict[str, torch.Tensor], str]:
    """The entries of ``state`` under the prefix that holds most ``expected`` keys, prefix removed; and the prefix."""
    expected = list(expected)
    candidates = list(KNOWN_PREFIXES)
    anchor = expected[0]
    # Any other prefix is found from where the model's first key sits.
    candidates += sorted({k[: -len(anchor)] for k in state if k.endswith(anchor)} - set(candidates))

    def found(prefix: str) -> int:
        return sum(prefix + k in state for k in expected)

    best = max(candidates, key=lambda p: (found(p), -candidates.index(p)))
    if found(best) == 0:
        sample = ", ".join(list(state)[:4])
        raise UserError(f"none of the encoder's keys (e.g. {anchor!r}) are in the checkpoint under any known "
                        f"prefix; its first keys: {sample}")
    return {k[len(best):]: v for k, v in state.items() if k.startswith(best)}, best


def check_fit(model_state: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], what: str) -> None:
    """One-line error naming the missing or mis-shaped keys when ``weights`` do not fill ``model_state``."""
    missing = [k for k in model_state if k not in weights and not k.endswith("num_batches_tracked")]
    shaped = [f"{k} {list(weights[k].shape)} vs {list(v.shape)}" for k, v in model_state.items()
              if k in weights and tuple(weights[k].shape) != tuple(v.shape)]
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise UserError(f"the checkpoint is not a complete {what}: missing {len(missing)} of {len(model_state)} "
                        f"keys: {', '.join(missing[:5])}{more}")
    if shaped:
        raise UserError(f"the checkpoint does not fit a {what}: {'; '.join(shaped[:3])}")


def load_fitted(model: torch.nn.Module, weights: dict[str, torch.Tensor], what: str) -> torch.nn.Module:
    """Check ``weights`` fill ``model`` (``check_fit``), load them (BatchNorm counters optional), eval mode."""
    own = model.state_dict()
    check_fit(own, weights, what)
    own.update({k: weights[k] for k in own if k in weights})
    model.load_state_dict(own, strict=True)
    return model.eval()
