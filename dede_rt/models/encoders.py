"""Victim encoders: load them from the formats users hold, wrap them behind one call.

Formats (``load_encoder(path, format="auto")``):
- ``badencoder``: a dict with ``state_dict`` from BadEncoder/DRUPE's SimCLR
  (backbone keys ``f.f.<i>...``; the projection head ``g.*`` is ignored). CTRL's
  ``backbone.*`` and DataParallel's ``module.*`` prefixes are also understood.
- ``state_dict``: a plain state dict of a CIFAR ResNet (``f.<i>...`` keys as
  ``CifarResNet`` saves them, or torchvision-style ``conv1/bn1/layer1..``).
- ``torchscript``: a ``torch.jit.save`` archive mapping images to embeddings.
- ``onnx``: any ONNX model mapping float NCHW images to [N, D] embeddings,
  run as a black box through onnxruntime.
- a family spec ``FAMILY:NAME`` with ``weights=`` (torchvision, timm, open_clip, hf_clip; see
  ``dede_rt.models.families``): ImageNet / CLIP encoders with their own preprocessing, which the
  description carries under ``preprocessing``.
Weights are always read with ``torch.load(weights_only=True)``. The ResNet's
depth and widths are inferred from the weights, so no architecture flag is
needed for checkpoints.
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dede_rt.errors import UserError
from dede_rt.models.families.checkpoints import read_checkpoint
from dede_rt.models.resnet import ARCHITECTURES, CifarResNet, ResNetConfig

FORMATS = ("auto", "badencoder", "state_dict", "torchscript", "onnx")
_IMAGENET_HINT = ("these are ImageNet ResNet weights (7x7 stem): load them as --encoder torchvision:resnet50 "
                  "(or resnet18/34/101) --weights FILE")
_TORCHVISION_STAGES = {"conv1": "0", "bn1": "1", "layer1": "3", "layer2": "4", "layer3": "5", "layer4": "6"}


class VictimEncoder(nn.Module):
    """A frozen image encoder: normalized float NCHW -> embedding [N, D], optionally L2-normalized."""

    def __init__(self, backbone: nn.Module, embed_dim: int, l2_normalize: bool = False, kind: str = "module") -> None:
        super().__init__()
        self.backbone = backbone.eval()
        self.embed_dim = embed_dim
        self.l2_normalize = l2_normalize
        self.kind = kind
        for p in self.backbone.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> VictimEncoder:
        """Frozen: BatchNorm statistics never update, whatever the caller asks."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        z = self.backbone(images)
        if z.ndim != 2:
            z = z.flatten(1)
        return F.normalize(z, dim=1) if self.l2_normalize else z


class OnnxBackbone(nn.Module):
    """An ONNX encoder run through onnxruntime (CPU); not differentiable."""

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        super().__init__()
        from dede_rt.optional import import_onnxruntime

        ort = import_onnxruntime("an ONNX encoder")

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise UserError(f"{path}: not a loadable ONNX model ({str(exc).splitlines()[0][:200]})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1:
            raise UserError(f"{path}: an ONNX encoder must take exactly one image input, it takes {len(inputs)}")
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        self.path = str(path)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.session.run([self.output_name], {self.input_name: images.detach().cpu().float().numpy()})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_path(path: str | Path) -> str:
    """SHA-256 of a file, or of a model folder's files (name and content of each, in name order)."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(f"{item.relative_to(path).as_posix()}\0{sha256_file(item)}\n".encode())
    return digest.hexdigest()


def detect_format(path: str | Path) -> str:
    """Guess an encoder file's format from its extension and contents."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return "onnx"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
    return "state_dict"  # refined to "badencoder" by the key layout once loaded


def backbone_state_dict(checkpoint: dict) -> tuple[dict[str, torch.Tensor], str]:
    """Extract ``CifarResNet`` weights (``f.<i>...`` keys) from any supported layout; returns (weights, layout)."""
    state = checkpoint.get("state_dict", checkpoint.get("model", checkpoint))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError("checkpoint holds no tensor state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("f.f.") for k in state):
        return {k[2:]: v for k, v in state.items() if k.startswith("f.f.")}, "badencoder"
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if any(k.startswith("f.") for k in state):
        return {k: v for k, v in state.items() if k.startswith("f.")}, "state_dict"
    if "conv1.weight" in state and any(k.startswith("layer1.") for k in state):
        mapped = {}
        for k, v in state.items():
            head, _, rest = k.partition(".")
            if head in _TORCHVISION_STAGES:
                mapped[f"f.{_TORCHVISION_STAGES[head]}.{rest}"] = v
        return mapped, "torchvision"
    if any(k.endswith("conv1.weight") and v.shape[1:] == (3, 7, 7) for k, v in state.items()):
        raise UserError(_IMAGENET_HINT)
    sample = ", ".join(list(state)[:4])
    raise UserError(f"unrecognised checkpoint layout (first keys: {sample}); expected BadEncoder 'f.f.*', "
                    "'f.*', 'backbone.*' or torchvision ResNet keys")


def infer_resnet_config(state: dict[str, torch.Tensor]) -> ResNetConfig:
    """Depth, block type and widths of a CIFAR ResNet from its weights."""
    if "f.0.weight" in state and state["f.0.weight"].shape[1:] == (3, 7, 7):
        raise UserError(_IMAGENET_HINT)
    if "f.0.weight" not in state or state["f.0.weight"].shape[1:] != (3, 3, 3):
        raise UserError("weights are not a CIFAR ResNet (expected a 3x3 stem conv 'f.0.weight' on RGB input)")
    layers, widths = [], []
    bottleneck = any(re.match(r"f\.3\.0\.conv3\.weight", k) for k in state)
    for stage in range(4):
        blocks = {int(m.group(1)) for k in state if (m := re.match(rf"f\.{stage + 3}\.(\d+)\.conv1\.weight", k))}
        if not blocks:
            raise UserError(f"weights are not a 4-stage ResNet (stage {stage + 1} missing)")
        layers.append(max(blocks) + 1)
        widths.append(int(state[f"f.{stage + 3}.0.conv1.weight"].shape[0]))
    return ResNetConfig("bottleneck" if bottleneck else "basic", tuple(layers), tuple(widths))


def arch_name(config: ResNetConfig) -> str:
    """The registered name of a ResNet config, or a descriptive one."""
    for name, known in ARCHITECTURES.items():
        if known == config:
            return name
    return f"resnet_{config.block}_{'-'.join(map(str, config.layers))}_w{'-'.join(map(str, config.widths))}"


def resnet_from_weights(state: dict[str, torch.Tensor]) -> CifarResNet:
    """Build a CIFAR ResNet that fits ``state`` and load it strictly."""
    model = CifarResNet(infer_resnet_config(state))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise UserError(f"weights do not fit a CIFAR ResNet: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


def _probe_dim(backbone: nn.Module, image_size: int) -> int:
    backbone.eval()  # a probe in train mode would update BatchNorm statistics
    with torch.no_grad():
        out = backbone(torch.zeros(2, 3, image_size, image_size))
    if out.ndim < 2 or out.shape[0] != 2:
        raise UserError(f"encoder output has shape {list(out.shape)}; expected [N, D] embeddings")
    return int(out[0].numel())


def load_encoder(
    path: str | Path, format: str = "auto", image_size: int = 32, l2_normalize: bool = False, *,
    weights: str | Path | None = None, embedding: str = "auto",
) -> tuple[VictimEncoder, dict]:
    """Load a victim encoder; returns it and a JSON description (format, arch, path, sha256, dim).

    ``path`` is an encoder file, or a family spec ``FAMILY:NAME`` whose checkpoint is ``weights`` (then
    ``image_size`` is the family's own and ``embedding`` picks ``backbone`` or ``head``).
    """
    from dede_rt.models.families import load_family, parse_spec

    spec = parse_spec(path, weights, embedding) if format == "auto" else None
    if spec is not None:
        backbone, extra, preprocessing = load_family(spec)
        dim = _probe_dim(backbone, preprocessing.image_size)
        description = {"format": spec.family, "path": str(spec.weights.resolve()), "sha256": sha256_path(spec.weights),
                       "embed_dim": dim, "l2_normalize": l2_normalize, **extra,
                       "preprocessing": preprocessing.to_dict()}
        return VictimEncoder(backbone, dim, l2_normalize, kind=spec.family), description
    path = Path(path)
    if format not in FORMATS:
        raise UserError(f"unknown encoder format {format!r}; choose one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise UserError(f"{path}: encoder file not found")
    fmt = detect_format(path) if format == "auto" else format
    arch = None
    if fmt == "onnx":
        backbone: nn.Module = OnnxBackbone(path)
    elif fmt == "torchscript":
        try:
            backbone = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise UserError(f"{path}: not a loadable TorchScript file ({str(exc).splitlines()[0][:160]})") from None
    else:
        weights_state, layout = backbone_state_dict(read_checkpoint(path))
        if format == "badencoder" and layout != "badencoder":
            raise UserError(f"{path}: no BadEncoder 'f.f.*' keys; this looks like a {layout} checkpoint")
        backbone = resnet_from_weights(weights_state)
        fmt, arch = layout, arch_name(backbone.config)
    dim = _probe_dim(backbone, image_size)
    description = {"format": fmt, "arch": arch, "path": str(path.resolve()), "sha256": sha256_file(path),
                   "embed_dim": dim, "l2_normalize": l2_normalize}
    return VictimEncoder(backbone, dim, l2_normalize, kind=fmt), description


def reload_encoder(info: dict, path: str | Path, image_size: int) -> VictimEncoder:
    """The encoder a detector's manifest record describes, from ``path`` (its file, or a moved copy)."""
    from dede_rt.models.families import FAMILIES

    if info["format"] in FAMILIES:
        return load_encoder(f"{info['format']}:{info.get('arch') or ''}", weights=path,
                            embedding=info.get("embedding", "auto"), l2_normalize=info.get("l2_normalize", False))[0]
    fmt = info["format"] if info["format"] in ("onnx", "torchscript") else "auto"
    return load_encoder(path, fmt, image_size, info.get("l2_normalize", False))[0]


def save_badencoder_checkpoint(model: CifarResNet, path: str | Path, epoch: int = 0) -> None:
    """Save a backbone in BadEncoder/DRUPE's layout: {'epoch', 'state_dict': {'f.f.*': ...}}."""
    state = {f"f.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"epoch": epoch, "state_dict": state}, path)
