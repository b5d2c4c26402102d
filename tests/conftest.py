"""Shared fixtures: small, fast artifacts built once per test session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dede_rt.data.demo import demo_dataset
from dede_rt.data.sources import ImageSet
from dede_rt.models.encoders import save_badencoder_checkpoint
from dede_rt.models.resnet import build_resnet

TINY_DECODER = {"dim": 32, "heads": 2, "encoder_depth": 1, "decoder_depth": 1, "patch_size": 4}


@pytest.fixture(scope="session")
def demo_images() -> ImageSet:
    """The embedded demo set (digits + photo crops), 32 px; ~4.2k images."""
    return demo_dataset(photo_count=600)


@pytest.fixture(scope="session")
def encoder_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised resnet_small saved in BadEncoder's checkpoint layout."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("encoder") / "victim.pth"
    save_badencoder_checkpoint(build_resnet("resnet_small").eval(), path)
    return path


@pytest.fixture(scope="session")
def tiny_detector_dir(tmp_path_factory: pytest.TempPathFactory, encoder_file: Path, demo_images: ImageSet) -> Path:
    """A detector bundle with a 1-block decoder trained for 2 epochs on 256 demo images (seconds)."""
    from dede_rt.training import TrainConfig, train_detector

    out = tmp_path_factory.mktemp("detector") / "det"
    # the summed score explicitly: most tests are about its paths (fused kernels, plugin, folded tail)
    train_detector(encoder_file, demo_images.images[:256], out, decoder_config=TINY_DECODER,
                   config=TrainConfig(epochs=2, batch_size=64), holdout_fraction=0.25, progress=False,
                   score="summed")
    return out


@pytest.fixture()
def rng() -> np.random.Generator:
    """A seeded numpy generator."""
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of small tensors: on a shared, loaded CPU it ran up to 30x faster (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def edited_bundle(tiny_detector_dir: Path, tmp_path: Path):
    """Returns edit(change) -> a copy of the tiny bundle whose manifest dict was changed in place by ``change``."""
    import json
    import shutil

    def edit(change) -> Path:
        bundle = tmp_path / f"edited{len(list(tmp_path.glob('edited*')))}"
        shutil.copytree(tiny_detector_dir, bundle)
        manifest = json.loads((bundle / "manifest.json").read_text())
        change(manifest)
        (bundle / "manifest.json").write_text(json.dumps(manifest))
        return bundle

    return edit
