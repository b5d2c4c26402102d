"""Triggers (pixel-exact), CTRL's frequency trigger, and the attack loss terms on tiny tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dede_rt.research.attacks.badencoder import BadEncoderConfig, badencoder_finetune, badencoder_losses
from dede_rt.research.attacks.ctrl import (FrequencyTrigger, block_dct, ctrl_trigger, dct_matrix, image_spectrum,
                                  poison_target_class, rgb_to_ycrcb, ycrcb_to_rgb)
from dede_rt.research.attacks.drupe import (DRUPEConfig, drupe_effectiveness, drupe_finetune, mean_pairwise_similarity,
                                   sliced_wasserstein)
from dede_rt.research.attacks.simclr import nt_xent
from dede_rt.data.transforms import Normalization
from dede_rt.data.triggers import blend_trigger, patch_trigger, white_square
from dede_rt.errors import UserError
from dede_rt.models.resnet import build_resnet

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def test_white_square_is_pixel_exact(rng):
    images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    out = white_square().stamp(images)
    inside = np.zeros((32, 32), bool)
    inside[21:31, 21:31] = True
    assert (out[:, inside] == 255).all()
    assert (out[:, ~inside] == images[:, ~inside]).all()
    assert out.dtype == np.uint8 and (images != out).any()


def test_patch_trigger_on_small_image():
    images = np.zeros((1, 6, 6, 3), np.uint8)
    patch = np.arange(12, dtype=np.uint8).reshape(2, 2, 3) + 1
    out = patch_trigger(6, patch, top=1, left=3).stamp(images)
    expected = np.zeros((6, 6, 3), np.uint8)
    expected[1:3, 3:5] = patch
    assert np.array_equal(out[0], expected)
    with pytest.raises(ValueError):
        patch_trigger(6, patch, top=5, left=0)


def test_blend_trigger_rounds_exactly():
    images = np.full((1, 4, 4, 3), 100, np.uint8)
    images[0, 0, 0] = (0, 255, 10)
    pattern = np.full((4, 4, 3), 200, np.uint8)
    out = blend_trigger(pattern, 0.25).stamp(images)
    assert (out[0, 1:, :] == 125).all()  # 100 * 0.75 + 200 * 0.25
    assert tuple(out[0, 0, 0]) == (50, 241, 58)  # 0+50, 191.25+50 -> 241, 7.5+50 -> 57.5 -> 58 (round half even)


def test_dct_matrix_is_orthonormal_and_block_dct_inverts(rng):
    c = dct_matrix(8)
    assert np.allclose(c @ c.T, np.eye(8))
    assert np.allclose(c[0], 1 / math.sqrt(8))  # DC row: cv2.dct's orthonormal scaling
    x = rng.normal(size=(2, 3, 16, 16))
    y = block_dct(x, 8)
    assert np.allclose(block_dct(y, 8, inverse=True), x)
    assert np.allclose(y[0, 0, :8, :8], c @ x[0, 0, :8, :8] @ c.T)  # each block is transformed on its own
    with pytest.raises(ValueError):
        block_dct(x, 5)


def test_ycrcb_matches_opencv_constants_and_inverts(rng):
    white = rgb_to_ycrcb(np.array([255.0, 255.0, 255.0]))
    assert np.allclose(white, [255.0, 128.0, 128.0])
    red = rgb_to_ycrcb(np.array([255.0, 0.0, 0.0]))
    assert np.allclose(red, [76.245, (255 - 76.245) * 0.713 + 128, (0 - 76.245) * 0.564 + 128])
    x = rng.uniform(0, 255, (5, 3))
    assert np.allclose(ycrcb_to_rgb(rgb_to_ycrcb(x)), x)


def test_ctrl_trigger_round_trip_visible_in_dct_small_in_pixels(rng):
    images = rng.integers(60, 190, (4, 32, 32, 3), dtype=np.uint8)  # mid-range: no clipping
    out = ctrl_trigger().stamp(images)
    diff = image_spectrum(out) - image_spectrum(images)
    for ch in (1, 2):
        for u, v in ((15, 15), (31, 31)):
            assert np.allclose(diff[:, ch, u, v], 100.0, atol=3.0)  # uint8 rounding costs a few units
    mask = np.ones(diff.shape[1:], bool)
    mask[1:, 15, 15] = mask[1:, 31, 31] = False
    assert np.abs(diff[:, mask]).max() < 3.0  # nothing else moved beyond rounding
    err = out.astype(np.float64) - images
    assert np.abs(err).mean() < 8 and np.abs(err).max() <= 40
    psnr = 10 * np.log10(255**2 / np.mean(err**2))
    assert psnr > 25
    single = ctrl_trigger().stamp(images[0])
    assert np.array_equal(single, out[0])


def test_ctrl_zero_magnitude_is_identity_and_bad_position_fails(rng):
    images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert np.array_equal(FrequencyTrigger(magnitude=0.0).stamp(images), images)
    with pytest.raises(ValueError):
        FrequencyTrigger(positions=((40, 1),)).stamp(images)


def test_poison_target_class_stamps_only_target_images(rng):
    images = rng.integers(60, 190, (200, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(200) % 4
    poisoned, idx = poison_target_class(images, labels, target=2, rate=0.05, seed=1)
    assert len(idx) == 10 and (labels[idx] == 2).all()
    changed = np.flatnonzero((poisoned != images).any(axis=(1, 2, 3)))
    assert np.array_equal(changed, idx)
    with pytest.raises(UserError, match="found 50: lower the CTRL poisoning rate"):
        poison_target_class(images, labels, target=2, rate=0.5)


def test_nt_xent_matches_hand_computation():
    z = torch.eye(2)
    # each anchor: positive cos 1, two negatives cos 0, temperature 0.5 -> -log(e^2 / (e^2 + 2))
    expected = math.log(1 + 2 * math.exp(-2))
    assert nt_xent(z, z.clone(), 0.5).item() == pytest.approx(expected, abs=1e-6)
    # scaling embeddings does not matter (cosine)
    assert nt_xent(3 * z, z, 0.5).item() == pytest.approx(expected, abs=1e-6)
    worse = nt_xent(z, z.flip(0), 0.5).item()  # positives orthogonal, a negative aligned
    assert worse > expected


def test_badencoder_loss_terms_sign_and_value():
    a = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    eff, ref, util = badencoder_losses(a, a, a, a, a)
    assert (eff.item(), ref.item(), util.item()) == pytest.approx((-1.0, -1.0, -1.0))
    eff, ref, util = badencoder_losses(a, -a, a, -a, a)
    assert (eff.item(), ref.item(), util.item()) == pytest.approx((1.0, 1.0, 1.0))
    orth = torch.tensor([[0.0, 1.0], [0.0, 5.0]])
    assert badencoder_losses(a, orth, a, a, a)[0].item() == pytest.approx(0.0, abs=1e-7)


def test_sliced_wasserstein_known_values():
    a = torch.tensor([[0.0], [1.0], [2.0]])
    assert sliced_wasserstein(a, a.flip(0)).item() == pytest.approx(0.0, abs=1e-7)  # order does not matter
    assert sliced_wasserstein(a, a + 3).item() == pytest.approx(3.0, abs=1e-5)  # 1-D: W2 of a shift
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    near, far = sliced_wasserstein(x, x + 0.1, 200, g), sliced_wasserstein(x, x + 1.0, 200, g)
    assert 0 < near < far
    with pytest.raises(ValueError):
        sliced_wasserstein(x, x[:10])


def test_anti_collapse_and_drupe_effectiveness_terms():
    collapsed = torch.ones(4, 3)
    assert mean_pairwise_similarity(collapsed).item() == pytest.approx(1.0)
    assert mean_pairwise_similarity(torch.eye(3)).item() == pytest.approx(0.0)
    refs = torch.eye(2)
    zt = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # each sample sits on its own reference
    eff, spread = drupe_effectiveness(zt, refs)
    assert eff.item() == pytest.approx(-1.0) and spread.item() == pytest.approx(0.0)
    eff, spread = drupe_effectiveness(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), refs)
    assert eff.item() == pytest.approx(-1.0) and spread.item() == pytest.approx(math.sqrt(0.5))  # std of (1, 0)


@pytest.mark.parametrize("attack", ["badencoder", "drupe"])
def test_finetune_pulls_triggered_embeddings_to_reference(attack, demo_images):
    torch.manual_seed(0)
    clean = build_resnet("resnet_small").eval()
    before = {k: v.clone() for k, v in clean.state_dict().items()}
    norm = Normalization()
    shadow, reference = demo_images.images[:64], demo_images.images[100:103]
    trigger = white_square()

    def similarity(model):
        with torch.no_grad():
            zt = torch.nn.functional.normalize(model(norm.apply(trigger.stamp(demo_images.images[200:232]))), dim=1)
            zr = torch.nn.functional.normalize(model(norm.apply(reference)), dim=1)
        return (zt @ zr.t()).max(dim=1).values.mean().item()

    if attack == "badencoder":
        victim = badencoder_finetune(clean, shadow, reference, trigger=trigger, normalization=norm,
                                     config=BadEncoderConfig(epochs=3, batch_size=32), progress=False)
    else:
        victim = drupe_finetune(clean, shadow, reference, trigger=trigger, normalization=norm,
                                config=DRUPEConfig(epochs=3, batch_size=32, warmup_epochs=1), progress=False)
    assert similarity(victim) > similarity(clean)
    assert all(torch.equal(before[k], v) for k, v in clean.state_dict().items())  # the clean model is untouched


def test_drupe_cost_schedule_rises_only_while_backdoor_is_effective():
    from dede_rt.research.attacks.drupe import next_cost

    cfg = DRUPEConfig(init_cost=0.1, cost_up=2.0, cost_down=4.0, effective_cosine=0.9)
    assert next_cost(0.0, 0.95, cfg) == pytest.approx(0.1)  # switched on
    assert next_cost(0.1, 0.95, cfg) == pytest.approx(0.2)  # raised
    assert next_cost(0.2, 0.5, cfg) == pytest.approx(0.05)  # lowered when the backdoor weakens
    assert next_cost(0.0, 0.5, cfg) == 0.0
