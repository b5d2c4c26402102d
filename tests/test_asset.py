import numpy as np
import pytest
import torch

from dede_rt.research.baselines.asset import AssetConfig, _fit_mlp, adjusted_outlyingness, asset_scores, medcouple
from dede_rt.data.transforms import Normalization


def test_medcouple_known_values():
    assert medcouple(np.arange(1, 10)) == pytest.approx(0.0)  # symmetric
    # x = 0, 1, 2, 10; median 1.5; kernel over (0|1) x (2|10): -0.5, 0.7, 0.0, 8/9 -> median 0.35
    assert medcouple(np.array([0.0, 1.0, 2.0, 10.0])) == pytest.approx(0.35)
    assert medcouple(np.random.default_rng(0).exponential(size=200)) > 0.1  # right-skewed


def test_adjusted_outlyingness_in_whisker_units():
    # 1..9: median 5, quartiles 3 and 7, medcouple 0 -> whiskers -3 and 13
    ao = adjusted_outlyingness(np.arange(1.0, 10.0))
    assert ao[0] == pytest.approx(0.5) and ao[-1] == pytest.approx(0.5) and ao[4] == pytest.approx(0.0)
    assert adjusted_outlyingness(np.r_[np.zeros(20), 1.0])[-1] == 0.0  # no spread: nothing is an outlier


def test_asset_mlp_scores_each_suspect_sample_reproducibly():
    rng = np.random.default_rng(0)
    clean = torch.from_numpy(rng.normal(size=(40, 16)).astype(np.float32))
    suspect = torch.from_numpy(rng.normal(size=(24, 16)).astype(np.float32))
    torch.manual_seed(0)
    a = _fit_mlp(suspect, clean, AssetConfig())
    torch.manual_seed(0)
    b = _fit_mlp(suspect, clean, AssetConfig())
    assert a.shape == (24,) and ((a > 0) & (a < 1)).all()  # sigmoid outputs, one per suspect sample
    torch.testing.assert_close(a, b)


def test_asset_scores_are_seeded_per_test_image(demo_images):
    imgs = demo_images.images[:48]
    labels = np.arange(48) % 4
    z = np.random.default_rng(1).normal(size=(48, 8)).astype(np.float32)
    z[:5] += 5.0
    conf = AssetConfig(batch_size=24, mlp_steps=3, arch="resnet_small", seed=3)
    args = (imgs[:36], labels[:36], z[:36])
    kwargs = dict(clean_u8=imgs[36:], clean_embeddings=z[36:], test_u8=imgs, test_labels=labels,
                  normalization=Normalization(), config=conf)
    a, b = asset_scores(*args, **kwargs), asset_scores(*args, **kwargs)
    assert a.shape == (48,) and np.isfinite(a).all() and (a >= 0).all()
    np.testing.assert_array_equal(a, b)
