import pytest
import torch

from dede_rt.models.decoder import (DecoderConfig, DeDeDecoder, draw_masks, patchify_images, unpatchify,
                                    visible_count)
from dede_rt.scoring import masked_sse, prototype_sse, reconstruction_loss, relative_sse, trimmed_sse

SMALL = dict(embed_dim=24, dim=32, heads=2, encoder_depth=2, decoder_depth=1)


def test_reference_defaults():
    c = DecoderConfig()
    assert (c.dim, c.heads, c.encoder_depth, c.decoder_depth, c.patch_size, c.image_size) == (192, 3, 12, 4, 4, 32)
    assert c.num_patches == 64 and c.patch_pixels == 48


def test_decoder_sizes_name_the_shapes():
    from dede_rt.errors import UserError
    from dede_rt.models.decoder_sizes import DECODER_SIZES, decoder_shape, size_name

    reference = DecoderConfig()  # the reference size is the DecoderConfig defaults, field for field
    assert DECODER_SIZES["reference"] == {k: getattr(reference, k) for k in DECODER_SIZES["reference"]}
    assert decoder_shape("small", dim=64, heads=None) == {**DECODER_SIZES["small"], "dim": 64}  # None keeps
    assert size_name({**DECODER_SIZES["small"], "patch_size": 8}) == "small"  # patch/bias are not the size
    assert size_name(decoder_shape("small", decoder_depth=3)) == "custom"
    with pytest.raises(UserError, match="unknown decoder size 'tiny'"):
        decoder_shape("tiny")


@pytest.mark.parametrize("image_size,patch", [(32, 4), (32, 8), (224, 32), (224, 16)])
@pytest.mark.parametrize("ratio", [0.0, 0.75, 0.9, 0.99])
def test_output_shapes_and_visible_count(image_size, patch, ratio):
    cfg = DecoderConfig(image_size=image_size, patch_size=patch, **SMALL)
    dec = DeDeDecoder(cfg)
    x, z = torch.randn(3, 3, image_size, image_size), torch.randn(3, 24)
    pred, masked = dec(x, z, ratio, torch.Generator().manual_seed(0))
    assert pred.shape == (3, cfg.num_patches, 3 * patch * patch)
    # exactly int(T * (1 - r)) visible patches per sample, as the reference
    assert (~masked).sum(1).tolist() == [int(cfg.num_patches * (1 - ratio))] * 3


def test_visible_count_matches_reference_rule():
    assert visible_count(64, 0.9) == 6
    assert visible_count(64, 0.99) == 0  # the test-time case: embedding only
    assert visible_count(64, 0.75) == 16
    assert visible_count(196, 0.99) == 1


def test_same_seed_same_mask_and_different_seed_differs():
    a = draw_masks(8, 64, 0.9, torch.Generator().manual_seed(3))
    b = draw_masks(8, 64, 0.9, torch.Generator().manual_seed(3))
    c = draw_masks(8, 64, 0.9, torch.Generator().manual_seed(4))
    assert torch.equal(a.masked, b.masked) and torch.equal(a.order, b.order)
    assert not torch.equal(a.masked, c.masked)
    # per-sample masks differ within a batch, except with shared=True
    assert not all(torch.equal(a.masked[0], a.masked[i]) for i in range(1, 8))
    s = draw_masks(8, 64, 0.9, torch.Generator().manual_seed(3), shared=True)
    assert all(torch.equal(s.masked[0], s.masked[i]) for i in range(8))
    # restore really un-shuffles
    assert torch.equal(torch.gather(a.order, 1, a.restore), torch.arange(64).expand(8, -1))


def test_zero_visible_is_deterministic_and_ignores_pixels():
    dec = DeDeDecoder(DecoderConfig(**SMALL)).eval()
    z = torch.randn(4, 24)
    p1, m1 = dec(torch.randn(4, 3, 32, 32), z, 0.99, torch.Generator().manual_seed(0))
    p2, m2 = dec(torch.randn(4, 3, 32, 32), z, 0.99, torch.Generator().manual_seed(9))
    assert m1.all() and m2.all()
    torch.testing.assert_close(p1, p2)  # only the embedding matters when nothing is visible
    torch.testing.assert_close(p1, dec.decode_embedding(z))
    torch.testing.assert_close(dec.head(dec.decode_hidden(z)), p1)


def test_visible_patches_change_the_prediction():
    dec = DeDeDecoder(DecoderConfig(**SMALL)).eval()
    z = torch.randn(2, 24)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    p1, _ = dec(torch.randn(2, 3, 32, 32), z, 0.5, g())
    p2, _ = dec(torch.randn(2, 3, 32, 32), z, 0.5, g())
    assert not torch.allclose(p1, p2)


def test_embedding_replaces_the_cls_output():
    dec = DeDeDecoder(DecoderConfig(**SMALL)).eval()
    x = torch.randn(2, 3, 32, 32)
    p1, _ = dec(x, torch.zeros(2, 24), 0.75, torch.Generator().manual_seed(0))
    p2, _ = dec(x, torch.ones(2, 24), 0.75, torch.Generator().manual_seed(0))
    assert not torch.allclose(p1, p2)


def test_patchify_round_trip_and_order():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    p = patchify_images(x, 4)
    assert p.shape == (2, 4, 48)
    # patch 1 is the top-right 4x4 block; values in (c, p1, p2) order
    torch.testing.assert_close(p[0, 1, :16], x[0, 0, :4, 4:].reshape(-1))
    torch.testing.assert_close(unpatchify(p, 4), x)


def test_loss_and_score_on_known_values():
    pred = torch.zeros(1, 2, 3)
    target = torch.tensor([[[1.0, 1.0, 1.0], [2.0, 0.0, 0.0]]])
    masked = torch.tensor([[True, False]])
    assert masked_sse(pred, target, masked).item() == pytest.approx(3.0)
    # mean over all 6 values of err^2 * mask = 3/6, divided by mask_ratio 0.5
    assert reconstruction_loss(pred, target, masked, 0.5).item() == pytest.approx(1.0)


def test_trimmed_score_drops_the_worst_patches():
    # per-patch SSE of sample 0: 1, 4, 9, 100 (a "pasted patch"); sample 1: all 4
    target = torch.tensor([[[1.0], [2.0], [3.0], [10.0]], [[2.0], [2.0], [2.0], [2.0]]])
    pred = torch.zeros_like(target)
    assert trimmed_sse(pred, target, 0.25).tolist() == pytest.approx([14.0, 12.0])  # 3 of 4 patches kept
    assert trimmed_sse(pred, target, 0.0).tolist() == masked_sse(pred, target, torch.ones(2, 4, dtype=torch.bool)).tolist()
    with pytest.raises(ValueError, match="trim"):
        trimmed_sse(pred, target, 1.0)


def test_relative_score_subtracts_the_best_fitting_prototypes():
    target = torch.tensor([[[1.0], [0.0]], [[0.0], [3.0]]])  # two images of two 1-value patches
    prototypes = torch.tensor([[[1.0], [0.0]], [[0.0], [0.0]]])
    assert prototype_sse(target, prototypes).tolist() == [[0.0, 1.0], [10.0, 9.0]]
    own = torch.tensor([5.0, 5.0])
    assert relative_sse(own, target, prototypes, 1).tolist() == pytest.approx([5.0, -4.0])
    assert relative_sse(own, target, prototypes, 2).tolist() == pytest.approx([4.5, -4.5])
    with pytest.raises(ValueError, match="k must be"):
        relative_sse(own, target, prototypes, 3)


def test_relative_score_ignores_a_patch_that_no_reconstruction_draws():
    # a pasted patch (patch 0) that neither the own reconstruction nor any prototype draws shifts the plain SSE
    # but not the relative score: its error enters both terms equally
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(3, 5, 4, generator=gen)
    pred, prototypes = torch.randn(3, 5, 4, generator=gen), torch.randn(6, 5, 4, generator=gen)
    pred[:, 0], prototypes[:, 0] = 0.0, 0.0  # nothing redraws patch 0
    stamped = target.clone()
    stamped[:, 0] = 7.0
    every = torch.ones(3, 5, dtype=torch.bool)
    own, own_stamped = masked_sse(pred, target, every), masked_sse(pred, stamped, every)
    assert (own_stamped - own).min() > 10.0
    assert relative_sse(own_stamped, stamped, prototypes, 2).tolist() == pytest.approx(
        relative_sse(own, target, prototypes, 2).tolist(), abs=1e-4)
