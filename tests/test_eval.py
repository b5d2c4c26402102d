"""The eval pipeline end to end on tiny victims, and the cached-embedding scoring path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dede_rt.data.transforms import Normalization
from dede_rt.research.evaluation import EvalConfig, run_eval
from dede_rt.research.evaluation.scores import embedding_score_sets
from dede_rt.research.evaluation.victims import EvalData, VictimConfig, VictimSpec, make_trigger
from dede_rt.errors import UserError
from dede_rt.models.decoder import patchify_images
from dede_rt.scoring import RelativeReference, prototype_reconstructions

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def test_cached_embedding_scores_equal_detector_scores(tiny_detector_dir, demo_images):
    from dede_rt.bundle import load_detector
    from dede_rt.training import compute_embeddings

    det = load_detector(tiny_detector_dir)
    images = demo_images.images[300:340]
    z = compute_embeddings(det.encoder, det.normalization, images)
    only = embedding_score_sets(det.decoder, det.normalization, images=images, embeddings=z)
    assert list(only) == ["dede"] and np.allclose(only["dede"], det.score(images), rtol=1e-5)
    # one pass gives all three: the reference sum, the patch-robust score (a quarter of the patches dropped: lower)
    # and the relative score against prototype reconstructions
    prototypes = prototype_reconstructions(det.decoder, compute_embeddings(det.encoder, det.normalization,
                                                                            demo_images.images[:50]))
    got = embedding_score_sets(det.decoder, det.normalization, images=images, embeddings=z, trim=0.25,
                               relative=RelativeReference(prototypes, 3))
    sums, trimmed = got["dede"], got["dede_trimmed"]
    assert np.allclose(sums, det.score(images), rtol=1e-5) and (trimmed < sums).all() and (trimmed > 0).all()
    target = patchify_images(det.normalization.apply(images), det.decoder.config.patch_size).flatten(1)
    nearest = np.sort(torch.cdist(target, prototypes.flatten(1)).square().numpy(), axis=1)[:, :3].mean(1)
    assert np.allclose(got["dede_relative"], sums - nearest, rtol=1e-4, atol=1e-2)
    # with the images' own reconstructions among the prototypes, the best fit is at most the own error
    own = RelativeReference.from_embeddings(det.decoder, z, 1)
    assert embedding_score_sets(det.decoder, det.normalization, images=images, embeddings=z,
                                relative=own)["dede_relative"].min() > -1e-2


def test_victim_spec_parsing_and_triggers():
    assert VictimSpec.parse("drupe:blend") == VictimSpec("drupe_blend", "drupe", "blend")
    assert VictimSpec.parse("mine=badencoder:white_square").name == "mine"
    for bad in ("drupe:ctrl_typo", "nope:blend", "ctrl:blend"):
        with pytest.raises(UserError):
            VictimSpec.parse(bad)
    with pytest.raises(UserError):
        make_trigger("checkerboard")
    assert make_trigger("white_square").mask[21:31, 21:31].all()
    faint, blend = make_trigger("faint_blend"), make_trigger("blend")
    assert np.array_equal(faint.pattern, blend.pattern) and np.allclose(faint.mask, 0.1) and np.allclose(blend.mask, 0.2)
    # the logo blend: a fixed natural pattern at opacity 0.2 over the whole image, pixel-exact on a flat image
    logo = make_trigger("logo_blend")
    assert VictimSpec.parse("drupe:logo_blend").trigger == "logo_blend"
    assert logo.pattern.shape == (32, 32, 3) and np.allclose(logo.mask, 0.2)
    assert logo.pattern.std() > 20 and np.array_equal(logo.pattern, make_trigger("logo_blend", seed=5).pattern)
    flat = np.full((1, 32, 32, 3), 100, np.uint8)
    expected = np.rint(0.8 * 100 + 0.2 * logo.pattern.astype(np.float64)).astype(np.uint8)
    assert np.abs(logo.stamp(flat)[0].astype(int) - expected).max() <= 1  # float32 rounding at .5 ties


def _tiny_data(demo_images) -> EvalData:
    digits = np.flatnonzero(demo_images.labels < 10)
    photos = np.flatnonzero(demo_images.labels >= 10)
    train, test = digits[:160], digits[160:220]
    return EvalData(np.concatenate([demo_images.images[train], demo_images.images[photos[:64]]]),
                    np.concatenate([demo_images.labels[train], demo_images.labels[photos[:64]]]),
                    demo_images.images[train], demo_images.labels[train],
                    demo_images.images[test], demo_images.labels[test], demo_images.images[photos[64:192]])


def _assert_downstream_consistent(records: list[dict]) -> None:
    """DeDe rows: the clean share removed is the FPR at the threshold, and removing flagged images never raises ASR."""
    probe = {(r["encoder"], r["trigger"]): r for r in records if r["method"] == "probe"}
    dede = [r for r in records if r["method"].startswith("dede")]
    assert dede
    for r in dede:
        assert r["removed_clean"] == pytest.approx(r["fpr_at_threshold"])
        assert r["asr_after"] <= probe[(r["encoder"], r["trigger"])]["asr"] + 1e-12
        assert r["asr_after"] <= 1.0 - r["tpr_at_threshold"] + 1e-12  # flagged triggered images cannot succeed


def test_collect_turns_constructed_scores_into_the_expected_records():
    """Known scores in, known numbers out: thresholds, TPR/FPR, AUROC direction, BA/ASR after removal."""
    from dede_rt.research.evaluation import (BaselineJob, DecoderJob, EncoderRun, EvalPlan, EvalSets, JobResult,
                                             ProbeJob, collect, execute)
    from dede_rt.research.evaluation.victims import Victim

    images = np.zeros((20, 32, 32, 3), np.uint8)
    labels = np.r_[np.zeros(10, int), np.ones(10, int)]  # 10 of the target class 0, 10 of class 1
    data = EvalData(images, labels, images, labels, images, labels, images[:0])
    sets = EvalSets(data=data, target=0, nontarget=labels != 0, triggers={}, triggered={"t": images[10:]},
                    regimes={}, splits={}, hard=images[:4], hard_kinds=("text", "text", "stripes", "stripes"))
    pred_trig = np.zeros(10, int)  # the probe sends every triggered image to the target: ASR 1
    run = EncoderRun(victim=Victim("v", "badencoder", "t", Path("v.pth")), own=("t",), embed_dim=2, embeddings={},
                     train_images={}, asset_suspects={}, pred_clean=labels.copy(), pred_trig={"t": pred_trig},
                     poisoned=False)
    row = {"encoder": "v", "attack": "badencoder", "trigger": "t"}
    clean_z = np.tile([[1.0, 0.0]], (20, 1)).astype(np.float32)
    trig_z = np.tile([[0.0, 3.0]], (10, 1)).astype(np.float32)  # larger norm, and far from the clean reference
    jobs = [ProbeJob(**row, pred_clean=labels, test_labels=labels, pred_trig=pred_trig, trig_labels=labels[10:],
                     target=0),
            BaselineJob(**row, view="raw", method="embedding_norm", regime="-", clean=clean_z, triggered=trig_z,
                        hard=trig_z[:4]),  # hard images with the triggered ones' norm: hard AUROC 1
            BaselineJob(**row, view="raw", method="knn", regime="id", clean=clean_z, triggered=trig_z,
                        reference=clean_z, k=3)]
    decoder = DecoderJob(**{k: v for k, v in row.items() if k != "trigger"}, view="raw", regime="id", seed=5,
                         triggers=("t",), decoder_config=None, train=None, train_images=images, train_embeddings=clean_z,
                         eval_images={}, eval_embeddings={}, normalization=Normalization())
    hold = np.arange(100, dtype=np.float32)  # threshold at 1% FPR: 99 (one clean score in 100 above it: none)
    scores = {"dede": {"hold": hold, "test": np.arange(20, dtype=np.float32),
                       "trig:t": np.r_[np.full(6, 150.0), np.full(4, 50.0)],  # 6 of 10 above the threshold
                       "hard": np.array([150.0, 10.0, 150.0, 150.0])},  # 3 of 4 above; 10 ties one clean score
              "dede_trimmed": {"hold": hold, "test": np.full(20, 120.0),  # every clean image flagged
                               "trig:t": np.full(10, 10.0)}}  # triggered below clean: AUROC 0
    plan = EvalPlan(config=EvalConfig(seeds=(5,)), sets=sets, runs={"v": run}, jobs=[*jobs, decoder])
    got = collect(plan, [*map(execute, jobs), JobResult(scores=scores, final_loss=0.5, seconds=2.0)])
    by = {r["method"]: r for r in got.records}
    assert [r["method"] for r in got.records] == ["probe", "embedding_norm", "knn", "dede", "dede_trimmed"]
    assert (by["probe"]["ba"], by["probe"]["asr"]) == (1.0, 1.0)
    assert by["embedding_norm"]["auroc"] == 1.0 and by["knn"]["auroc"] == 1.0
    # hard clean images: AUROC against the clean test scores; FPR only where a calibrated threshold exists
    assert by["embedding_norm"]["hard_auroc"] == 1.0 and "hard_fpr" not in by["embedding_norm"]
    assert "hard_auroc" not in by["knn"] and "hard_auroc" not in by["dede_trimmed"]  # those scored none
    assert by["dede"]["hard_auroc"] == pytest.approx((3 + 10.5 / 20) / 4) and by["dede"]["hard_fpr"] == 0.75
    assert by["dede"]["hard_fpr_by_kind"] == {"text": 0.5, "stripes": 1.0}
    dede = by["dede"]
    assert dede["threshold"] == 99.0 and dede["auroc"] == 1.0
    assert (dede["tpr_at_threshold"], dede["fpr_at_threshold"], dede["removed_clean"]) == (0.6, 0.0, 0.0)
    assert dede["ba_after"] == 1.0 and dede["asr_after"] == pytest.approx(0.4)  # the 4 unflagged still succeed
    trimmed = by["dede_trimmed"]
    assert trimmed["auroc"] == 0.0 and trimmed["removed_clean"] == 1.0 and np.isnan(trimmed["ba_after"])
    assert trimmed["asr_after"] == 1.0
    assert set(got.curves) == {("v", "t", "raw", m, g) for m, g in
                               (("embedding_norm", "-"), ("knn", "id"), ("dede", "id"), ("dede_trimmed", "id"))}


def test_eval_config_validates_on_construction(tmp_path):
    """The checks live in EvalConfig (the CLI repeats none): each mistake fails when the config is built."""
    assert EvalConfig().victims and EvalConfig().regimes == ("id", "ood")
    victim = tmp_path / "v.pth"
    victim.write_bytes(b"x")
    loaded = EvalConfig(victim_files=(f"badencoder:blend={victim}",), clean_encoder=victim)
    assert loaded.victims == () and loaded.clean_encoder == str(victim)  # loading replaces the default victims
    user = EvalConfig(train_data=tmp_path / "train", test_data=tmp_path / "test")
    assert user.regimes == ("id",) and user.train_data == str(tmp_path / "train")  # no OOD set: id only
    for kwargs, fragment in (({"train_data": "a"}, "go together"), ({"ood_data": "o"}, "--ood-data needs"),
                             ({"regimes": ("id", "x")}, "id and/or ood"),
                             ({"train_data": "a", "test_data": "b", "regimes": ("ood",)}, "needs --ood-data"),
                             ({"poison_rate": 1.0}, "--poison-rate"), ({"seeds": ()}, "at least one"),
                             ({"trim": 1.0}, "--trim"), ({"fpr": 0.0}, "--fpr"), ({"hard_images": -1}, "--hard-images"),
                             ({"decoder": {**EvalConfig().decoder, "patch_size": 3}}, "does not fit"),
                             ({"victim_files": (f"badencoder:blend={victim}",)}, "need --clean-encoder"),
                             ({"victims": ("a=badencoder:blend", "a=drupe:blend")}, "unique")):
        with pytest.raises(UserError, match=fragment):
            EvalConfig(**kwargs)
    with pytest.raises(UserError, match="--ctrl-magnitude > 0"):
        VictimConfig(ctrl_magnitude=0)
    with pytest.raises(UserError, match="LR schedule"):
        EvalConfig(decoder_lr_schedule="linear")


def test_decoder_jobs_carry_the_lr_schedule_and_batch(demo_images):
    from dede_rt.training import TrainConfig

    cfg = EvalConfig(decoder_lr_schedule="cosine", decoder_batch=64)
    train = TrainConfig(epochs=cfg.decoder_epochs, batch_size=cfg.decoder_batch, lr_schedule=cfg.decoder_lr_schedule)
    assert (train.batch_size, train.lr_schedule) == (64, "cosine")
    assert EvalConfig().decoder_lr_schedule == "constant"  # eval's own default stays the earlier tables'


def test_combined_score_standardizes_each_kind_on_the_held_out_split():
    from dede_rt.research.evaluation.scores import combined_scores

    rng = np.random.default_rng(0)
    summed = {"hold": rng.normal(1000, 100, 200), "test": rng.normal(1000, 100, 50), "trig": np.full(5, 1300.0)}
    relative = {"hold": rng.normal(0, 2, 200), "test": rng.normal(0, 2, 50), "trig": np.full(5, 0.0)}
    got = combined_scores(summed, relative)
    assert abs(got["hold"].mean()) < 1e-5 and got["hold"].std() == pytest.approx(np.sqrt(2 + 2 * np.corrcoef(
        summed["hold"], relative["hold"])[0, 1]), rel=1e-4)
    zs = (1300 - summed["hold"].mean()) / summed["hold"].std()
    zr = (0 - relative["hold"].mean()) / relative["hold"].std()
    assert got["trig"] == pytest.approx(np.full(5, zs + zr), rel=1e-5)  # ~3 + ~0: neither scale swamps the other


def _agg(encoder, attack, trigger, method, auroc, tpr, view="raw"):
    return {"encoder": encoder, "attack": attack, "trigger": trigger, "view": view, "method": method, "regime": "id",
            "n": 3, "auroc": auroc, "auroc_std": 0.01, "tpr_at_threshold": tpr}


def test_score_choice_rule_on_constructed_rows():
    from dede_rt.research.evaluation.report import score_choice

    rows = [{"encoder": e, "attack": a, "trigger": t, "view": "raw", "method": "probe", "regime": "-", "asr": asr}
            for e, a, t, asr in (("be_sq", "badencoder", "sq", 1.0), ("be_bl", "badencoder", "bl", 1.0),
                                 ("fail", "drupe", "bl", 0.3), ("clean", "clean", "sq", 0.0), ("clean", "clean", "bl", 0.0))]
    rows += [_agg("be_sq", "badencoder", "sq", "dede", 0.99, 0.90), _agg("be_sq", "badencoder", "sq", "dede_relative", 0.98, 0.80),
             _agg("be_bl", "badencoder", "bl", "dede", 0.86, 0.30), _agg("be_bl", "badencoder", "bl", "dede_relative", 0.98, 0.70),
             _agg("clean", "clean", "sq", "dede", 0.92, 0.40), _agg("clean", "clean", "sq", "dede_relative", 0.58, 0.05),
             _agg("clean", "clean", "bl", "dede", 0.55, 0.02), _agg("clean", "clean", "bl", "dede_relative", 0.75, 0.10),
             # a failed attack is no victim: its numbers must not count
             _agg("fail", "drupe", "bl", "dede", 0.99, 0.99), _agg("fail", "drupe", "bl", "dede_relative", 0.10, 0.0)]
    got = score_choice(rows)
    assert got["summary"]["summed"]["victims"] == 2  # the failed attack left out
    # summed: margins 0.50, 0.28 -> 0.39; worst shortfall 0.12 on the blend (> 0.02): not eligible
    assert got["summary"]["summed"]["mean_tpr_margin"] == pytest.approx(0.39)
    assert not got["summary"]["summed"]["eligible"]
    # relative: margins 0.75, 0.60 -> 0.675; shortfall 0.01 on the square: eligible, chosen
    assert got["summary"]["relative"]["mean_tpr_margin"] == pytest.approx(0.675)
    assert got["summary"]["relative"]["eligible"] and got["chosen"] == "relative"
    # without a control there is nothing to choose by
    assert score_choice([r for r in rows if r["attack"] != "clean"]) == {}


def test_run_eval_writes_paper_shaped_table(tmp_path, demo_images):
    config = EvalConfig(victims=("badencoder:white_square", "ctrl:ctrl"),
                        victim=VictimConfig(simclr_epochs=1, simclr_batch=64, finetune_epochs=1, ctrl_rate=0.02),
                        decoder={"dim": 32, "heads": 2, "encoder_depth": 1, "decoder_depth": 1, "patch_size": 4},
                        decoder_epochs=1, decoder_batch=64, seeds=(1, 2), l2_regimes=("id",), decree_steps=3,
                        knn_k=5, recon_examples=3, decoder_precision="bf16")
    lines = []
    results = run_eval(config, out=tmp_path / "out", progress=False, log=lines.append, data=_tiny_data(demo_images))
    out = tmp_path / "out"
    md = (out / "results.md").read_text()
    assert "| BadEncoder | white square | raw |" in md and "| BadEncoder | white square | l2 |" in md
    assert "| control: clean encoder | white square | raw |" in md and "| CTRL | frequency | raw |" in md
    assert "1 epochs (bf16 training), decoder" in md
    for name in ("roc.png", "histograms.png", "reconstructions.png"):
        assert 0 < (out / name).stat().st_size < 300_000
    saved = json.loads((out / "results.json").read_text())
    dede = [r for r in saved["records"] if r["method"] == "dede"]
    # encoders: clean (2 triggers) + 2 victims; views: raw (id, ood) + l2 (id only); 2 seeds
    assert len({(r["encoder"], r["view"], r["regime"], r["seed"]) for r in dede}) == 3 * 3 * 2
    assert {(r["view"], r["regime"]) for r in dede} == {("raw", "id"), ("raw", "ood"), ("l2", "id")}
    _assert_downstream_consistent(saved["records"])
    # the patch-robust column: same decoders, one record per DeDe record, its own (lower) scores and threshold
    trimmed = [r for r in saved["records"] if r["method"] == "dede_trimmed"]
    key = lambda r: (r["encoder"], r["trigger"], r["view"], r["regime"], r["seed"])  # noqa: E731
    assert sorted(map(key, trimmed)) == sorted(map(key, dede))
    by_key = {key(r): r for r in dede}
    assert all(r["threshold"] < by_key[key(r)]["threshold"] for r in trimmed)
    assert "DeDe trimmed (ID)" in md and "worst 25% of patches" in md
    relative = [r for r in saved["records"] if r["method"] == "dede_relative"]  # every regime and view
    assert sorted(map(key, relative)) == sorted(map(key, dede))
    combined = [r for r in saved["records"] if r["method"] == "dede_combined"]  # and the standardized sum of both
    assert sorted(map(key, combined)) == sorted(map(key, dede)) and "DeDe combined (ID)" in md
    # these 1-epoch attacks fail (ASR < 0.8): no victim to choose a score kind by, and the table says so
    assert "Score kinds: no working victim" in md and saved["score_choice"] == {}
    assert "DeDe relative (ID)" in md and "DeDe relative (OOD)" in md and "best-fitting of 256" in md
    asset = [r for r in saved["records"] if r["method"] == "asset"]  # one per (encoder, trigger), raw view
    assert sorted((r["encoder"], r["trigger"]) for r in asset) == [
        ("badencoder_white_square", "white_square"), ("clean", "ctrl"), ("clean", "white_square"), ("ctrl_ctrl", "ctrl")]
    assert all(np.isfinite(r["auroc"]) and np.isfinite(r["auprc"]) for r in asset) and "ASSET (simplified" in md
    norm_l2 = [r for r in saved["records"] if r["method"] == "embedding_norm" and r["view"] == "l2"]
    assert all(r["auroc"] == pytest.approx(0.5) for r in norm_l2)  # constant norm: chance level, as it must be
    assert {v["name"] for v in results["victims"]} == {"clean", "badencoder_white_square", "ctrl_ctrl"}
    assert any("FAILED" in line or "backdoored" in line for line in lines)
    # victims are cached: a second run reuses them
    lines.clear()
    run_eval(config, out=tmp_path / "out", progress=False, log=lines.append, data=_tiny_data(demo_images))
    assert sum("reusing" in line for line in lines) == 3


def test_victim_cache_keeps_victims_built_with_other_settings(tmp_path):
    from dede_rt.research.evaluation.victims import victim_cache_paths

    def build(key):  # what simclr_victim / build_victims write after training
        path, meta_path, meta = victim_cache_paths(tmp_path, "ctrl_ctrl", key)
        assert meta is None
        path.write_bytes(b"weights")
        meta_path.write_text(json.dumps({"key": key, "path": str(path), "build_seconds": 1.0}))
        return path

    one, four = build({"attack": "ctrl", "rate": 0.01}), build({"attack": "ctrl", "rate": 0.04})
    assert one != four and one.is_file() and four.is_file()  # the second build did not overwrite the first
    for key, path in (({"attack": "ctrl", "rate": 0.01}, one), ({"attack": "ctrl", "rate": 0.04}, four)):
        assert victim_cache_paths(tmp_path, "ctrl_ctrl", key)[0] == path
        assert victim_cache_paths(tmp_path, "ctrl_ctrl", key)[2]["build_seconds"] == 1.0
    # a victim cached by an older version as plain name.pth/.json is still reused when its key matches
    legacy = tmp_path / "clean.pth"
    legacy.write_bytes(b"weights")
    (tmp_path / "clean.json").write_text(json.dumps({"key": {"epochs": 30}, "path": str(legacy), "build_seconds": 2}))
    path, _, meta = victim_cache_paths(tmp_path, "clean", {"epochs": 30})
    assert path == legacy and meta["build_seconds"] == 2
    path, _, meta = victim_cache_paths(tmp_path, "clean", {"epochs": 200})
    assert meta is None and path != legacy


def test_victim_cache_ignores_the_ood_set(tmp_path):
    """No victim is built from the OOD images: adding --ood-data reuses the victims (older keys held its size)."""
    from dede_rt.research.evaluation.victims import victim_cache_paths

    data = {"pretrain": 10, "id_train": 10, "test": 5, "sources": {"train": "/d/train.npz", "test": "/d/test.npz"}}
    old_key = {"epochs": 30, "data": {**data, "ood_train": 0}}  # written by a version that kept the OOD size
    path = tmp_path / "clean-0123456789.pth"
    path.write_bytes(b"weights")
    (tmp_path / "clean-0123456789.json").write_text(json.dumps({"key": old_key, "path": str(path),
                                                                "build_seconds": 3}))
    with_ood = {"epochs": 30, "data": {**data, "ood_train": 1200,
                                       "sources": {**data["sources"], "ood": "/d/ood.npz"}}}
    assert victim_cache_paths(tmp_path, "clean", with_ood)[0] == path
    assert victim_cache_paths(tmp_path, "clean", {"epochs": 30, "data": data})[2]["build_seconds"] == 3
    other_test = {"epochs": 30, "data": {**data, "test": 6}}
    assert victim_cache_paths(tmp_path, "clean", other_test)[2] is None  # anything else still counts


def test_poison_training_split_stamps_only_the_chosen_training_images(demo_images):
    from dede_rt.data.transforms import Normalization
    from dede_rt.data.triggers import white_square
    from dede_rt.research.evaluation.plan import poison_training_split
    from dede_rt.models.encoders import VictimEncoder
    from dede_rt.models.resnet import build_resnet
    from dede_rt.training import compute_embeddings

    torch.manual_seed(0)
    encoder = VictimEncoder(build_resnet("resnet_small").eval(), 128)
    images = demo_images.images[:60]
    norm = Normalization()
    z = compute_embeddings(encoder, norm, images)
    train_idx = np.arange(10, 60)
    trig = white_square()
    out, z_out = poison_training_split(encoder, norm, images, embeddings=z, train_idx=train_idx, rate=0.2, trigger=trig,
                                       seed=3)
    changed = np.flatnonzero((out != images).reshape(len(images), -1).any(1))
    assert len(changed) == 10 and set(changed) <= set(train_idx)  # 20% of the training split, never the hold-out
    np.testing.assert_array_equal(out[changed], trig.stamp(images[changed]))
    moved = np.flatnonzero(np.abs(z_out - z).max(1) > 0)
    assert set(moved) == set(changed)
    np.testing.assert_allclose(z_out[changed], compute_embeddings(encoder, norm, out[changed]), rtol=1e-5, atol=1e-6)
    again, _ = poison_training_split(encoder, norm, images, embeddings=z, train_idx=train_idx, rate=0.2, trigger=trig,
                                     seed=3)
    np.testing.assert_array_equal(again, out)
    assert images is not out and (images[changed] != out[changed]).any()  # inputs are not modified in place


# --- the user's own victims and data (``--victim-file``, ``--clean-encoder``, ``--train/--test/--ood-data``) ---

def _save_folder(root, images, labels=None):
    from PIL import Image

    for i, image in enumerate(images):
        folder = root if labels is None else root / str(labels[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def user_files(tmp_path_factory, demo_images):
    """Train: class folders 0-2; test: .npz with labels; OOD: a flat folder of photos; two random resnet_small files."""
    from dede_rt.models.encoders import save_badencoder_checkpoint
    from dede_rt.models.resnet import build_resnet

    root = tmp_path_factory.mktemp("user")
    idx = {c: np.flatnonzero(demo_images.labels == c) for c in range(3)}
    train = np.concatenate([idx[c][:25] for c in range(3)])
    test = np.concatenate([idx[c][25:40] for c in range(3)])
    photos = np.flatnonzero(demo_images.labels >= 10)[:40]
    _save_folder(root / "train", demo_images.images[train], demo_images.labels[train])
    np.savez(root / "test.npz", images=demo_images.images[test], labels=demo_images.labels[test])
    np.savez(root / "unlabelled.npz", images=demo_images.images[test])
    _save_folder(root / "ood", demo_images.images[photos])
    for seed, name in ((1, "victim.pth"), (2, "clean.pth")):
        torch.manual_seed(seed)
        save_badencoder_checkpoint(build_resnet("resnet_small").eval(), root / name)
    return root


TINY_EVAL = ("--decoder-dim", "32", "--decoder-heads", "2", "--decoder-depth", "1", "--encoder-depth", "1",
             "--decoder-epochs", "1", "--seeds", "1", "--no-l2", "--decree-steps", "2")


def test_victim_file_parsing():
    from dede_rt.research.evaluation.victims import VictimFile

    assert VictimFile.parse("badencoder:white_square=/x/m=1.pth") == VictimFile(
        "badencoder_white_square", "badencoder", "white_square", Path("/x/m=1.pth"))
    assert VictimFile.parse("mine=my-attack:blend=m.onnx").name == "mine"
    for bad in ("badencoder:checkerboard=m.pth", "badencoder=m.pth", "clean:blend=m.pth", "x:blend="):
        with pytest.raises(UserError):
            VictimFile.parse(bad)


def test_load_eval_data_matches_class_folders_by_name(tmp_path, demo_images):
    from dede_rt.research.evaluation.victims import load_eval_data

    names = np.array(["cat", "dog", "eel"])
    _save_folder(tmp_path / "train", demo_images.images[:12], names[np.arange(12) % 3])
    _save_folder(tmp_path / "test", demo_images.images[12:16], names[[2, 2, 1, 1]])  # no 'cat': indices must not shift
    data = load_eval_data(tmp_path / "train", tmp_path / "test", log=lambda m: None)
    assert sorted(data.test_labels.tolist()) == [1, 1, 2, 2] and len(data.ood_train) == 0
    assert data.summary()["sources"]["test"] == str(tmp_path / "test")


def test_eval_cli_on_user_victims_and_data(tmp_path, user_files):
    from typer.testing import CliRunner

    from dede_rt.cli import app

    u = user_files
    result = CliRunner().invoke(app, [
        "eval", "--out", str(tmp_path / "out"), "--victim-file", f"badencoder:white_square={u / 'victim.pth'}",
        "--victim-file", f"mine=myattack:blend={u / 'victim.pth'}", "--clean-encoder", str(u / "clean.pth"),
        "--train-data", str(u / "train"), "--test-data", str(u / "test.npz"), "--ood-data", str(u / "ood"),
        *TINY_EVAL])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(v["name"], v["attack"], v["loaded"]) for v in saved["victims"]] == [
        ("clean", "clean", True), ("badencoder_white_square", "badencoder", True), ("mine", "myattack", True)]
    assert not (tmp_path / "out" / "victims").exists()  # nothing built
    assert saved["data"]["test"] == 45 and saved["data"]["sources"]["ood"] == str(u / "ood")
    dede = [r for r in saved["records"] if r["method"] == "dede"]
    assert {(r["encoder"], r["trigger"], r["regime"]) for r in dede} == {
        (e, t, g) for e, t in (("clean", "white_square"), ("clean", "blend"), ("badencoder_white_square",
                                                                             "white_square"), ("mine", "blend"))
        for g in ("id", "ood")}
    _assert_downstream_consistent(saved["records"])
    probes = [r for r in saved["records"] if r["method"] == "probe"]
    assert all(np.isfinite(r["ba"]) and np.isfinite(r["asr"]) for r in probes) and len(probes) == 4
    assert set(saved["decree"]) == {"clean", "badencoder_white_square", "mine"}
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| control: clean encoder | noise blend | raw |" in md and "| myattack (mine) | noise blend | raw |" in md
    assert f"loaded from {u / 'victim.pth'}" in md


def _eval_cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "dede_rt.cli", "eval", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("case, fragment", [
    ("no_clean_encoder", "need --clean-encoder"),
    ("unknown_trigger", "unknown trigger 'checkerboard'"),
    ("unlabelled_test", "the test data needs labels"),
    ("bad_trim", "--trim is the share of patches"),
    ("bad_precision", "unknown training precision 'fp8'"),
    ("bad_relative", "the relative score needs --relative-k >= 0"),
    ("bad_drupe_stealth", "--drupe-stealth must be >= 0"),
    ("bad_ctrl_magnitude", "--ctrl-magnitude > 0"),
    ("ctrl_rate_above_target_share", "lower the CTRL poisoning rate"),
])
def test_eval_cli_user_input_errors(tmp_path, user_files, case, fragment):
    u = user_files
    args = {"no_clean_encoder": ["--victim-file", f"badencoder:white_square={u / 'victim.pth'}"],
            "unknown_trigger": ["--victim-file", f"badencoder:checkerboard={u / 'victim.pth'}",
                                "--clean-encoder", u / "clean.pth"],
            "unlabelled_test": ["--victim-file", f"badencoder:white_square={u / 'victim.pth'}", "--clean-encoder",
                                u / "clean.pth", "--train-data", u / "train", "--test-data", u / "unlabelled.npz"],
            "bad_trim": ["--victim-file", f"badencoder:white_square={u / 'victim.pth'}", "--clean-encoder",
                         u / "clean.pth", "--trim", "1.0"],
            "bad_precision": ["--victim-file", f"badencoder:white_square={u / 'victim.pth'}", "--clean-encoder",
                              u / "clean.pth", "--train-precision", "fp8"],
            "bad_relative": ["--victim-file", f"badencoder:white_square={u / 'victim.pth'}", "--clean-encoder",
                             u / "clean.pth", "--relative-k", "10", "--prototypes", "4"],
            "bad_drupe_stealth": ["--victim", "drupe:white_square", "--drupe-stealth", "-0.1"],
            "bad_ctrl_magnitude": ["--victim", "ctrl:ctrl", "--ctrl-magnitude", "0"],
            # user data: 75 train images, 25 of class 0: 50% of them cannot all be target-class images
            "ctrl_rate_above_target_share": ["--victim", "ctrl:ctrl", "--ctrl-rate", "0.5", "--regimes", "id",
                                             "--train-data", u / "train", "--test-data", u / "train"]}[case]
    proc = _eval_cli("--out", tmp_path / "out", *args, *TINY_EVAL)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], proc.stderr


def test_ctrl_magnitude_changes_the_poison_and_the_cache_key_only_when_set(tmp_path, monkeypatch):
    import dede_rt.research.evaluation.victims as victims

    seen = []
    monkeypatch.setattr(victims, "simclr_victim", lambda out, name, images, key, *a, **k: seen.append((images, key)))
    rng = np.random.default_rng(0)
    unused = np.zeros((4, 32, 32, 3), np.uint8)
    data = victims.EvalData(rng.integers(40, 200, (40, 32, 32, 3), dtype=np.uint8), np.arange(40) % 4,
                            unused, np.zeros(4, int), unused, np.zeros(4, int), unused)
    for magnitude in (100.0, 200.0):
        victims.build_ctrl_victim(tmp_path, "ctrl_ctrl", data, normalization=Normalization(),
                                  config=victims.VictimConfig(ctrl_rate=0.1, ctrl_magnitude=magnitude),
                                  log=lambda *_: None)
    (reference, ref_key), (strong, strong_key) = seen
    assert "magnitude" not in ref_key and strong_key == {**ref_key, "magnitude": 200.0}  # old caches keep their key
    changed = (reference != data.pretrain).any(axis=(1, 2, 3))
    assert changed.sum() == 4 and np.array_equal(changed, (strong != data.pretrain).any(axis=(1, 2, 3)))
    step = lambda images: np.abs(images[changed].astype(int) - data.pretrain[changed]).mean()
    assert 1.7 < step(strong) / step(reference) < 2.3  # twice the DCT magnitude, up to uint8 rounding


def test_simclr_victims_do_not_depend_on_the_random_state_before_them(tmp_path):
    from dede_rt.research.evaluation.victims import simclr_victim

    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    config = VictimConfig(simclr_epochs=1, simclr_batch=8)
    weights = []
    for run in range(2):
        torch.rand(run * 100 + 1)  # other work (e.g. loading a cached victim) consumed the global generator
        (tmp_path / str(run)).mkdir()
        path, _ = simclr_victim(tmp_path / str(run), "clean", images, key={"run": run}, normalization=Normalization(),
                                config=config, progress=False, log=lambda *_: None)
        weights.append(torch.load(path, map_location="cpu", weights_only=False))
    first, second = (w["state_dict"] for w in weights)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_histograms_show_the_ood_decoders_when_no_id_ones_ran():
    from dede_rt.research.evaluation.report import histogram_key

    both = {("v", "blend", "raw", "dede", "id"): 1, ("v", "blend", "raw", "dede", "ood"): 2}
    assert histogram_key(both, "v", "blend") == ("v", "blend", "raw", "dede", "id")
    ood_only = {("v", "blend", "raw", "dede", "ood"): 2, ("v", "blend", "l2", "dede", "id"): 3}
    assert histogram_key(ood_only, "v", "blend") == ("v", "blend", "raw", "dede", "ood")
    assert histogram_key(ood_only, "v", "white_square") is None


def test_drupe_stealth_option_sets_both_stealth_weights():
    from dede_rt.research.attacks.drupe import DRUPEConfig
    from dede_rt.cli import _drupe_overrides

    assert _drupe_overrides(None) == {}  # the defaults: victims cached without the option keep their cache key
    config = DRUPEConfig(**_drupe_overrides(0.05))
    assert (config.lambda_swd, config.lambda_collapse) == (0.05, 0.05)
    assert config.lambda_std_refs == DRUPEConfig().lambda_std_refs


def test_drupe_stealth_help_names_the_real_default():
    import typer.main

    from dede_rt.research.attacks.drupe import DRUPEConfig
    from dede_rt.cli import app

    command = typer.main.get_command(app).commands["eval"]
    (option,) = [p for p in command.params if p.name == "drupe_stealth"]
    default = DRUPEConfig()
    assert default.lambda_swd == default.lambda_collapse  # one number describes both
    assert f"DRUPEConfig's {default.lambda_swd})" in option.help  # the CLI names it literally (no torch import)


def test_run_eval_with_poisoned_id_training(tmp_path, demo_images):
    config = EvalConfig(victims=("badencoder:white_square", "badencoder:blend"),
                        victim=VictimConfig(simclr_epochs=1, simclr_batch=64, finetune_epochs=1),
                        decoder={"dim": 32, "heads": 2, "encoder_depth": 1, "decoder_depth": 1, "patch_size": 4},
                        decoder_epochs=1, decoder_batch=64, seeds=(1,), regimes=("id",), l2_variants=(False,),
                        poison_rate=0.2, high_norm_share=0.2, decree_steps=0, knn_k=5, recon_examples=2)
    lines = []
    results = run_eval(config, out=tmp_path / "out", progress=False, log=lines.append, data=_tiny_data(demo_images))
    dede = [r for r in results["records"] if r["method"] == "dede"]
    # the control's poisoned ID set differs per trigger: one decoder per (encoder, trigger), each scoring its own row
    assert sorted((r["encoder"], r["trigger"]) for r in dede) == [
        ("badencoder_blend", "blend"), ("badencoder_white_square", "white_square"),
        ("clean", "blend"), ("clean", "white_square")]
    assert any("training 4 DeDe decoders" in line for line in lines)
    md = (tmp_path / "out" / "results.md").read_text()
    assert "carrying the row's trigger" in md and "CTRL mod is on" in md
    # the hard-clean-image control: every DeDe record (victims and the clean control) and embedding baseline
    assert results["hard_images"]["count"] == 200 and sum(results["hard_images"]["kinds"].values()) == 200
    scored = [r for r in results["records"] if r["method"] in ("dede", "dede_trimmed", "dede_relative",
                                                               "embedding_norm", "knn")]
    assert {r["encoder"] for r in scored} == {"clean", "badencoder_blend", "badencoder_white_square"}
    assert all(0.0 <= r["hard_auroc"] <= 1.0 for r in scored)
    decoders = [r for r in scored if r["method"].startswith("dede")]
    assert all(0.0 <= r["hard_fpr"] <= 1.0 and set(r["hard_fpr_by_kind"]) == set(results["hard_images"]["kinds"])
               for r in decoders)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert all("hard_auroc" in r and "hard_fpr" in r for r in saved["summary"] if r["method"].startswith("dede"))
    hard_md = md.split("### False alarms: hard clean images")[1].split("### Downstream")[0]
    rows = [line for line in hard_md.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 4 and sum(r.startswith("| control: clean encoder |") for r in rows) == 2  # one per trigger
