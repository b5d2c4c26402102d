"""The tiny CLIP built here and its BadCLIP-style backdoor, on 32-px photo crops and a small backbone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dede_rt.data.demo import demo_photos
from dede_rt.data.transforms import CLIP_MEAN, CLIP_STD, Normalization
from dede_rt.research.attacks.badclip import BadCLIPConfig, optimize_patch, poison_finetune
from dede_rt.research.attacks.clip import (ATTRIBUTE_WORDS, EOT, PAD, CLIPConfig, TinyCLIP, Vocabulary, caption,
                                           caption_matches, class_text_embeddings, clip_loss, image_attributes,
                                           train_clip, zero_shot_predict)
from dede_rt.research.probe import attack_success_rate

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NORM = Normalization(CLIP_MEAN, CLIP_STD, 32)


def _backbone() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


@pytest.fixture(scope="module")
def crops():
    return demo_photos(480, 32, 0), demo_photos(160, 32, 5)


@pytest.fixture(scope="module")
def trained(crops):
    train, _ = crops
    torch.manual_seed(0)
    model = TinyCLIP(_backbone(), 32, Vocabulary(train.classes), embed_dim=32)
    losses = train_clip(model, train.images, train.labels, train.classes, normalization=NORM,
                        config=CLIPConfig(epochs=12, batch_size=64, crop_scale=None, attribute_rate=0.3), progress=False)
    return model, losses


def test_vocabulary_ends_captions_with_eot_and_pads():
    vocab = Vocabulary(["hubble_deep_field", "coffee"], templates=("a photo of the {}",), length=8)
    ids = vocab.encode(["a photo of the hubble_deep_field", "the coffee"])
    assert ids.shape == (2, 8) and len(vocab) == len(vocab.index) + 2
    assert ids[0, 7] == EOT and (ids[0, :7] > EOT).all()  # 7 words ("hubble deep field" is three), then EOT
    assert ids[1, 2] == EOT and (ids[1, 3:] == PAD).all()


def test_clip_loss_counts_every_true_caption_as_a_positive():
    z = torch.eye(4)
    labels = np.array([0, 0, 1, 2])
    matches = caption_matches(labels, np.zeros((4, 3), np.int64), np.zeros((4, 3), bool))
    assert matches.sum() == 6 and matches[0, 1] and matches[1, 0]  # class-only captions: same class, positive
    scale = torch.tensor(np.log(10.0))
    aligned = clip_loss(z, z, matches, scale)
    swapped = clip_loss(z, z[[2, 3, 0, 1]], matches, scale)
    assert aligned < swapped
    # images 0 and 1 share a label: the target splits between them, so the loss is not the one-hot one
    one_hot = torch.nn.functional.cross_entropy(10 * z @ z.t(), torch.arange(4))
    assert not torch.isclose(aligned, one_hot)


def test_attributes_are_measured_from_pixels_and_stated_captions_match_only_true_images():
    gray = np.full((1, 16, 16, 3), 40, np.uint8)  # dark, gray, flat
    red = np.zeros((1, 16, 16, 3), np.uint8)
    red[..., 0] = 250  # a strong red cast
    stripes = np.zeros((1, 16, 16, 3), np.uint8)
    stripes[:, :, ::2] = 255  # busy
    codes, thresholds = image_attributes(np.concatenate([gray, red, stripes]))
    words = [[ATTRIBUTE_WORDS[a][c] for a, c in enumerate(row)] for row in codes]
    assert words[0][:2] == ["dark", "gray"] and words[1][1] == "red" and words[2][2] == "detailed"
    assert words[0][2] == "smooth" and image_attributes(red, thresholds)[0].tolist() == codes[1:2].tolist()
    assert caption("a photo of the {}", "coffee", codes[1], np.array([False, True, False])) == "a photo of the red coffee"
    stated = np.array([[False] * 3, [False, True, False], [False] * 3])
    m = caption_matches(np.zeros(3, np.int64), codes, stated).numpy()
    assert m[1, 1] and not m[0, 1] and not m[2, 1] and m[:, 0].all()  # "red" is true of the red image only


def test_training_aligns_images_with_their_captions(trained, crops):
    model, losses = trained
    _, test = crops
    assert losses[-1] < 0.8 * losses[0]
    accuracy = (zero_shot_predict(model, test.classes, test.images, NORM) == test.labels).mean()
    assert accuracy > 3 / len(test.classes)  # chance is 1/16


def test_badclip_patch_and_poisoning_raise_the_target_rate(trained, crops):
    model, _ = trained
    train, test = crops
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = BadCLIPConfig(patch_size=8, top=24, left=24, steps=40, batch_size=32, poison_fraction=0.2,
                           finetune=CLIPConfig(epochs=4, batch_size=64, lr=1e-3, crop_scale=None, flip=False))
    trigger = optimize_patch(model, train.images, train.labels, train.classes, 0, normalization=NORM,
                             config=config, progress=False)
    assert trigger.mask.sum() == 64 and trigger.mask[24:, 24:].all() and trigger.pattern.dtype == np.uint8
    target_text = class_text_embeddings(model, train.classes)[0]

    def cosine_to_target(m, images):
        with torch.no_grad():
            return (torch.nn.functional.normalize(m.visual(NORM.apply(images)), dim=1) @ target_text).mean().item()

    others = test.images[test.labels != 0]
    assert cosine_to_target(model, trigger.stamp(others)) > cosine_to_target(model, others)  # stage 1 works alone
    victim = poison_finetune(model, train.images, train.labels, train.classes, 0, trigger, normalization=NORM,
                             config=config, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the clean model is untouched

    def asr(m):
        return attack_success_rate(zero_shot_predict(m, test.classes, trigger.stamp(test.images), NORM), test.labels, 0)

    assert asr(victim) > asr(model) and asr(victim) > 0.5
