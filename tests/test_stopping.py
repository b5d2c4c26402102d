"""When training ends: the budget planner's arithmetic, early stopping, and the trainer following both."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dede_rt.data.transforms import Normalization
from dede_rt.errors import UserError
from dede_rt.models.decoder import DecoderConfig
from dede_rt.models.encoders import load_encoder
from dede_rt.stopping import AUTO_MAX_EPOCHS, Budget, EarlyStopping
from dede_rt.training import (AUTO_BATCH_SIZE, AUTO_LR_SCHEDULE, REFERENCE_BATCH_SIZE, HeldOutError, TrainConfig,
                              compute_embeddings, train_decoder)

DCONF = DecoderConfig(embed_dim=128, dim=32, heads=2, encoder_depth=1, decoder_depth=1)


def test_budget_plans_whole_epochs_in_what_is_left():
    budget = Budget(max_seconds=600.0, max_epochs=200)
    # 40 s already spent (loading, embedding, epoch 1), 5 s kept for thresholds: 555 s / 17 s = 32 more epochs
    assert budget.epochs(done=1, epoch_seconds=17.0, spent=40.0, reserve=5.0) == 33
    assert budget.epochs(done=1, epoch_seconds=0.5, spent=10.0, reserve=5.0) == 200  # capped by the schedule
    assert budget.epochs(done=1, epoch_seconds=30.0, spent=700.0, reserve=5.0) == 1  # over budget: what is done
    assert Budget(None, 40).epochs(done=1, epoch_seconds=1e6, spent=1e6, reserve=0) == 40  # no budget: the cap
    assert budget.allows_another(epoch_seconds=10.0, spent=585.0, reserve=5.0)
    assert not budget.allows_another(epoch_seconds=10.0, spent=586.0, reserve=5.0)
    config = TrainConfig()
    assert config.auto and config.budget() == Budget(600.0, AUTO_MAX_EPOCHS)
    # cosine (the auto default) ends with its plan; a constant LR stops early after 5 flat epochs
    assert config.stop_patience() == 0 and TrainConfig(lr_schedule="constant").stop_patience() == 5
    assert TrainConfig(patience=3).stop_patience() == 3
    fixed = TrainConfig(epochs="200")  # the CLI passes text: the reference schedule, no budget, no early stop
    assert fixed.epochs == 200 and fixed.budget() == Budget(None, 200) and fixed.stop_patience() == 0
    # the reference's batch and constant LR with a fixed schedule; the measured budget defaults with auto
    assert (fixed.batch_size, fixed.lr_schedule) == (REFERENCE_BATCH_SIZE, "constant")
    assert (config.batch_size, config.lr_schedule) == (AUTO_BATCH_SIZE, AUTO_LR_SCHEDULE)
    assert TrainConfig(batch_size=128, lr_schedule="cosine", epochs=3).batch_size == 128
    with pytest.raises(UserError, match="--epochs"):
        TrainConfig(epochs="many")
    with pytest.raises(UserError, match="--max-minutes"):
        TrainConfig(max_minutes=0)


def test_early_stopping_keeps_the_best_epoch_of_a_constructed_curve():
    stopper = EarlyStopping(patience=3, min_delta=0.002)
    curve = [10.0, 8.0, 7.0, 7.01, 6.999, 7.2, 7.1]  # 6.999 is < 0.2 % better than 7.0: not an improvement
    kept = [stopper.update(epoch, error) for epoch, error in enumerate(curve, 1)]
    assert kept == [True, True, True, False, False, False, False]
    assert stopper.best_epoch == 3 and stopper.best == 7.0
    assert stopper.should_stop and stopper.since_best == 4
    again = EarlyStopping.from_state(stopper.state_dict())
    assert again == stopper
    never = EarlyStopping(patience=0)
    for epoch, error in enumerate([1.0, 2.0, 3.0, 4.0], 1):
        never.update(epoch, error)
    assert not never.should_stop and never.best_epoch == 1


@pytest.fixture(scope="module")
def setup(encoder_file, demo_images):
    enc, _ = load_encoder(encoder_file)
    norm = Normalization()
    hold = demo_images.images[96:128]
    return enc, norm, demo_images.images[:96], HeldOutError(hold, compute_embeddings(enc, norm, hold), norm)


def _weights(decoder) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in decoder.parameters()])


def test_trainer_plans_from_its_first_epoch_and_keeps_within_the_plan(setup, monkeypatch):
    enc, norm, imgs, hold = setup
    calls = []
    plan = Budget.epochs

    def recording(self, **kw):
        calls.append((kw["done"], kw["epoch_seconds"]))
        return plan(self, **kw)

    monkeypatch.setattr(Budget, "epochs", recording)
    config = TrainConfig(batch_size=32, seed=5, max_minutes=0.05, precision="fp32")  # 3 s in all
    result = train_decoder(enc, norm, imgs, DCONF, config, progress=False, holdout=hold, reserve_seconds=0.5)
    first = result.curve[0]
    # The plan is the budget's arithmetic over what was measured, not a clock read in the test.
    expected = plan(config.budget(), done=1, epoch_seconds=first["seconds"], spent=result.plan_made_at, reserve=0.5)
    assert result.first_planned_epochs == expected
    assert 1 <= result.epochs_run <= result.planned_epochs
    # then re-planned after every later epoch at the mean pace of the epochs after the timed first one
    seconds = [c["seconds"] for c in result.curve]
    assert calls[0] == (1, seconds[0])
    assert [done for done, _ in calls[1:]] == list(range(2, 1 + len(calls)))
    for done, pace in calls[1:]:
        assert pace == pytest.approx(sum(seconds[1:done]) / (done - 1))
    if result.stopped == "planned":
        assert result.epochs_run == result.planned_epochs
    assert result.stopped in ("planned", "budget", "early_stop")
    assert all(c["holdout_error"] is not None and math.isfinite(c["holdout_error"]) for c in result.curve)
    assert result.eta_seconds == pytest.approx((expected - 1) * first["seconds"] + 0.5)


def test_early_stop_keeps_the_best_decoder_and_resume_is_a_no_op(setup, tmp_path):
    enc, norm, imgs, hold = setup
    # min_delta 0.99 with patience 1: nothing after epoch 1 counts as better, so it stops after epoch 2.
    config = TrainConfig(batch_size=32, seed=5, patience=1, min_delta=0.99, precision="fp32")
    stopped = train_decoder(enc, norm, imgs, DCONF, config, progress=False, holdout=hold, checkpoint_dir=tmp_path)
    assert stopped.stopped == "early_stop" and stopped.epochs_run == 2 and stopped.best_epoch == 1
    assert stopped.kept_epoch == 1
    # the same first epoch as a fixed 1-epoch run on the auto default's schedule (cosine: the warm-up epoch)
    one = train_decoder(enc, norm, imgs, DCONF, TrainConfig(epochs=1, batch_size=32, seed=5, precision="fp32",
                                                            lr_schedule=config.lr_schedule), progress=False)
    assert torch.equal(_weights(stopped.decoder), _weights(one.decoder))  # epoch 1's decoder was kept
    again = train_decoder(enc, norm, imgs, DCONF, config, progress=False, holdout=hold, checkpoint_dir=tmp_path,
                          resume=True)
    assert again.epochs_run == 0 and again.stopped == "early_stop" and again.losses == stopped.losses
    assert torch.equal(_weights(again.decoder), _weights(stopped.decoder))


def test_bf16_and_fp32_scores_of_one_decoder_rank_alike(setup, demo_images):
    """bf16 autocast (the default where the CPU has it) must not reorder the scores: Spearman >= 0.99."""
    from scipy.stats import spearmanr

    from dede_rt.scoring import ScoreTail, TestMask

    enc, norm, imgs, _ = setup
    decoder = train_decoder(enc, norm, imgs, DCONF, TrainConfig(epochs=3, batch_size=32, seed=5, precision="fp32"),
                            progress=False).decoder
    probe = demo_images.images[200:456]
    x, z = norm.apply(probe), torch.from_numpy(compute_embeddings(enc, norm, probe))
    tail = ScoreTail(decoder, TestMask(DCONF.num_patches))
    with torch.no_grad():
        fp32 = tail(x, z).numpy()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = tail(x, z).float().numpy()
    assert not np.array_equal(fp32, bf16)  # autocast really changed the arithmetic
    assert spearmanr(fp32, bf16).statistic >= 0.99


def test_cosine_schedule_warms_up_then_decays_to_zero():
    from dede_rt.training import scheduled_lr

    assert scheduled_lr(1e-3, "constant", 5, 3, 10, 20) == 1e-3
    # the first (planning) epoch warms up linearly from lr/10, whether or not the plan exists yet
    assert scheduled_lr(1e-3, "cosine", 0, 0, 10, None) == pytest.approx(1e-4)
    assert scheduled_lr(1e-3, "cosine", 0, 5, 10, None) == pytest.approx(5.5e-4)
    assert scheduled_lr(1e-3, "cosine", 1, 0, 10, 11) == pytest.approx(1e-3)  # peak when the decay starts
    assert scheduled_lr(1e-3, "cosine", 6, 0, 10, 11) == pytest.approx(5e-4)  # half-way
    assert scheduled_lr(1e-3, "cosine", 10, 10, 10, 11) == pytest.approx(0.0, abs=1e-12)
    lrs = [scheduled_lr(1e-3, "cosine", e, b, 4, 9) for e in range(1, 9) for b in range(4)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay after the warm-up
