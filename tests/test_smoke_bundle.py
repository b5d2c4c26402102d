import numpy as np

from dede_rt.bundle import load_detector
from dede_rt.engines.torch_runner import TorchRunner


def test_bundle_round_trip_scores_identically(tiny_detector_dir, demo_images):
    det = load_detector(tiny_detector_dir)
    batch = demo_images.images[300:340]
    a = det.score(batch, batch_size=16)
    with TorchRunner(tiny_detector_dir) as runner:
        b = runner.infer(batch)
    assert a.shape == (40,) and np.isfinite(a).all()
    np.testing.assert_allclose(a, b, rtol=1e-5)
    assert det.threshold(0.01) >= det.threshold(0.05)
