import dataclasses

import numpy as np
import pytest
import torch

from dede_rt.data.transforms import Normalization
from dede_rt.errors import UserError
from dede_rt.models.decoder import DecoderConfig
from dede_rt.models.encoders import load_encoder
from dede_rt.models.decoder import patchify_images
from dede_rt.training import TrainConfig, compute_embeddings, high_norm_samples, train_decoder

DCONF = DecoderConfig(embed_dim=128, dim=32, heads=2, encoder_depth=1, decoder_depth=1)
CONF = TrainConfig(epochs=2, batch_size=32, seed=5)


@pytest.fixture(scope="module")
def setup(encoder_file, demo_images):
    enc, _ = load_encoder(encoder_file)
    return enc, Normalization(), demo_images.images[:96]


def _weights(result):
    return torch.cat([p.detach().flatten() for p in result.decoder.parameters()])


def test_training_is_seeded_and_deterministic(setup):
    enc, norm, imgs = setup
    a = train_decoder(enc, norm, imgs, DCONF, CONF, progress=False)
    b = train_decoder(enc, norm, imgs, DCONF, CONF, progress=False)
    assert a.losses == b.losses and torch.equal(_weights(a), _weights(b))
    c = train_decoder(enc, norm, imgs, DCONF, TrainConfig(epochs=2, batch_size=32, seed=6), progress=False)
    assert not torch.equal(_weights(a), _weights(c))


def test_cached_embeddings_train_exactly_like_reencoding(setup):
    """The cache is a pure speed-up: same seed, same decoder as re-encoding every batch."""
    enc, norm, imgs = setup
    cached = train_decoder(enc, norm, imgs, DCONF, CONF, progress=False)
    reenc = train_decoder(enc, norm, imgs, DCONF, CONF, progress=False, reencode=True)
    torch.testing.assert_close(_weights(cached), _weights(reenc), rtol=1e-5, atol=1e-6)


def test_memmap_cache(setup, tmp_path):
    enc, norm, imgs = setup
    mm = compute_embeddings(enc, norm, imgs, batch_size=40, cache_path=tmp_path / "emb.npy")
    ram = compute_embeddings(enc, norm, imgs)
    assert isinstance(mm, np.memmap) and mm.shape == (96, 128)
    np.testing.assert_allclose(np.load(tmp_path / "emb.npy"), ram, rtol=1e-5)


def test_resume_continues_bit_exactly(setup, tmp_path):
    enc, norm, imgs = setup
    full = train_decoder(enc, norm, imgs, DCONF, TrainConfig(epochs=3, batch_size=32, seed=5), progress=False)
    train_decoder(enc, norm, imgs, DCONF, TrainConfig(epochs=1, batch_size=32, seed=5), checkpoint_dir=tmp_path,
                  progress=False)  # "killed" after epoch 1
    resumed = train_decoder(enc, norm, imgs, DCONF, TrainConfig(epochs=3, batch_size=32, seed=5),
                            checkpoint_dir=tmp_path, resume=True, progress=False)
    assert resumed.epochs_run == 2 and resumed.losses == full.losses
    assert torch.equal(_weights(resumed), _weights(full))
    with pytest.raises(UserError, match="training options changed"):
        train_decoder(enc, norm, imgs, DCONF, TrainConfig(epochs=4, batch_size=32, seed=5, lr=0.1),
                      checkpoint_dir=tmp_path, resume=True, progress=False)


def test_resume_accepts_a_checkpoint_from_before_an_option_existed(setup, tmp_path):
    """A checkpoint written before ``precision`` existed resumes as its default (fp32), and refuses bf16."""
    import json

    enc, norm, imgs = setup
    # fp32 explicitly: "auto" is bf16 on CPUs with AVX512-BF16/AMX, and the old checkpoint's value is fp32
    train_decoder(enc, norm, imgs, DCONF, TrainConfig(epochs=1, batch_size=32, seed=5, precision="fp32"),
                  checkpoint_dir=tmp_path, progress=False)
    ckpt = tmp_path / "train_state.pt"
    state = torch.load(ckpt, weights_only=True)
    old = json.loads(state["config"])
    del old["precision"]
    state["config"] = json.dumps(old)
    torch.save(state, ckpt)
    resumed = train_decoder(enc, norm, imgs, DCONF, TrainConfig(epochs=2, batch_size=32, seed=5, precision="fp32"),
                            checkpoint_dir=tmp_path, resume=True, progress=False)
    assert resumed.epochs_run == 1
    with pytest.raises(UserError, match="'precision': \\('fp32', 'bf16'\\)"):
        train_decoder(enc, norm, imgs, DCONF, TrainConfig(epochs=3, batch_size=32, seed=5, precision="bf16"),
                      checkpoint_dir=tmp_path, resume=True, progress=False)


def test_adamw_and_grad_clip_options(setup):
    enc, norm, imgs = setup
    r = train_decoder(enc, norm, imgs, DCONF, TrainConfig(epochs=1, batch_size=32, optimizer="adamw", grad_clip=1.0),
                      progress=False)
    assert np.isfinite(r.losses[0])
    with pytest.raises(UserError, match="unknown optimizer"):
        train_decoder(enc, norm, imgs, DCONF, TrainConfig(epochs=1, optimizer="sgd"), progress=False)


def test_bf16_training_is_seeded_and_tracks_fp32(setup):
    """bf16 autocast changes the arithmetic, not the training: same seed, same run; losses close to fp32's."""
    enc, norm, imgs = setup
    conf = TrainConfig(epochs=3, batch_size=32, seed=5, precision="bf16")
    a = train_decoder(enc, norm, imgs, DCONF, conf, progress=False)
    b = train_decoder(enc, norm, imgs, DCONF, conf, progress=False)
    assert a.losses == b.losses and torch.equal(_weights(a), _weights(b))
    assert all(p.dtype == torch.float32 for p in a.decoder.parameters())  # master weights stay fp32
    fp32 = train_decoder(enc, norm, imgs, DCONF, TrainConfig(epochs=3, batch_size=32, seed=5, precision="fp32"),
                         progress=False)
    assert a.losses != fp32.losses  # autocast really ran
    np.testing.assert_allclose(a.losses, fp32.losses, rtol=0.05)
    assert a.losses[-1] < a.losses[0]
    with pytest.raises(UserError, match="unknown training precision"):
        TrainConfig(precision="fp8")


def test_wrong_embedding_dimension(setup):
    enc, norm, imgs = setup
    with pytest.raises(UserError, match="512-d"):
        train_decoder(enc, norm, imgs, DecoderConfig(embed_dim=512, dim=32, heads=2, encoder_depth=1, decoder_depth=1),
                      CONF, embeddings=np.zeros((96, 128), np.float32), progress=False)


def test_embedding_cache_is_reused_only_for_the_same_inputs(setup, tmp_path, monkeypatch):
    from dede_rt import training

    enc, norm, imgs = setup
    first = training.cached_embeddings(enc, norm, imgs, "abc", tmp_path, progress=False)
    calls = []
    monkeypatch.setattr(training, "compute_embeddings", lambda *a, **k: calls.append(1) or first)
    again = training.cached_embeddings(enc, norm, imgs, "abc", tmp_path, progress=False)
    np.testing.assert_array_equal(again, first)
    assert calls == []  # reused
    training.cached_embeddings(enc, norm, imgs[:50], "abc", tmp_path, progress=False)
    training.cached_embeddings(enc, norm, imgs, "other-encoder", tmp_path, progress=False)
    assert len(calls) == 2  # different images / encoder: recomputed


def test_large_caches_go_to_a_memmap(setup, tmp_path, monkeypatch):
    from dede_rt import training

    enc, norm, imgs = setup
    monkeypatch.setattr(training, "MEMMAP_BYTES", 1024)
    out = training.cached_embeddings(enc, norm, imgs, "abc", tmp_path, progress=False)
    assert isinstance(out, np.memmap)
    assert isinstance(training.cached_embeddings(enc, norm, imgs, "abc", tmp_path, progress=False), np.memmap)


def test_high_norm_samples_is_the_top_share_by_norm():
    z = np.zeros((10, 3), np.float32)
    z[:, 0] = np.arange(10)  # norms 0..9
    assert np.flatnonzero(high_norm_samples(z, 0.2)).tolist() == [8, 9]
    with pytest.raises(UserError, match="high-norm share"):
        TrainConfig(high_norm_share=1.0)


def test_high_norm_share_trains_the_high_norm_samples_toward_a_constant(setup):
    """The reference's CTRL mod: high-norm embeddings learn to draw the constant 1 image, the rest themselves."""
    _, norm, imgs = setup
    rng = np.random.default_rng(0)
    z = rng.normal(size=(len(imgs), DCONF.embed_dim)).astype(np.float32)
    z[:12] *= 10.0  # 12 of 96 samples with large norm
    conf = TrainConfig(epochs=25, batch_size=32, seed=5, high_norm_share=12 / 96)
    # Two decoder blocks: with the reference's bias-free qkv a single 32-wide block leaves one of the 12
    # high-norm samples nearer itself than the constant after 25 epochs (it had a qkv bias to lean on before).
    dconf = dataclasses.replace(DCONF, decoder_depth=2)
    decoder = train_decoder(None, norm, imgs, dconf, conf, embeddings=z, progress=False).decoder
    with torch.no_grad():
        pred = decoder.decode_embedding(torch.from_numpy(z))
    target = patchify_images(norm.apply(imgs), DCONF.patch_size)
    to_one = (pred - 1.0).square().mean(dim=(1, 2))
    to_self = (pred - target).square().mean(dim=(1, 2))
    assert (to_one[:12] < to_self[:12]).all()  # high-norm: drawn as the constant
    assert to_one[:12].mean() < 0.5 * to_one[12:].mean()  # the others are not
