"""``EvalConfig``: everything ``dede-rt eval`` varies, validated when it is built (the CLI repeats no check)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from dede_rt.data.transforms import Normalization
from dede_rt.errors import UserError
from dede_rt.models.decoder import visible_count
from dede_rt.models.decoder_sizes import DECODER_SIZES
from dede_rt.research.evaluation.victims import DEFAULT_VICTIMS, VictimConfig, VictimFile, VictimSpec
from dede_rt.scoring import PROTOTYPES, RELATIVE_K, TEST_MASK_RATIO
from dede_rt.training import TrainConfig

EVAL_DECODER = {**DECODER_SIZES["small"], "patch_size": 4}  # every eval table was measured with this shape
REGIMES = ("id", "ood")


def _default_regimes(train_data: str | None, ood_data: str | None) -> tuple[str, ...]:
    """Both regimes, except the id one alone for the user's data without an OOD set."""
    return ("id",) if train_data is not None and ood_data is None else REGIMES


@dataclass
class EvalConfig:
    """Everything ``dede-rt eval`` varies; defaults sized for a few CPU cores. Invalid settings raise UserError.

    ``victims=None`` means the default victims, or none when ``victim_files`` are given; ``regimes=None`` means
    id and ood, or id alone when ``train_data`` is given without ``ood_data``.
    """

    victims: tuple[str, ...] | None = None  # "[NAME=]ATTACK:TRIGGER": victims to build
    victim: VictimConfig = field(default_factory=VictimConfig)
    decoder: dict = field(default_factory=lambda: dict(EVAL_DECODER))
    decoder_epochs: int = 40
    decoder_batch: int = 128
    decoder_lr: float = 1e-3
    decoder_lr_schedule: str = "constant"  # or "cosine" (warm-up + cosine decay: ``dede-rt train``'s default)
    decoder_precision: str = "fp32"  # "bf16": decoders train under bfloat16 autocast (TrainConfig.precision)
    train_mask_ratio: float = 0.9
    poison_rate: float = 0.0  # share of the ID training split carrying the row's trigger (reference: 0.1)
    trim: float = 0.25  # the patch-robust DeDe column drops this share of worst patches (0 = no such column)
    relative_k: int = RELATIVE_K  # the relative DeDe column: k best-fitting prototypes (0 = no such column)
    prototypes: int = PROTOTYPES  # clean training embeddings decoded as the relative score's prototypes
    high_norm_share: float = 0.0  # the reference's CTRL mod for every decoder (TrainConfig.high_norm_share)
    seeds: tuple[int, ...] = (21, 22, 23)
    regimes: tuple[str, ...] | None = None
    l2_variants: tuple[bool, ...] = (False, True)
    l2_regimes: tuple[str, ...] = REGIMES  # regimes in which the L2 view gets decoders (CPU budget)
    fpr: float = 0.01
    holdout_fraction: float = 0.15
    knn_k: int = 10
    decree_steps: int = 200
    asset_epochs: int = 1  # ASSET baseline epochs (the reference: 1); 0 = skip
    asset_poison_rate: float = 0.1  # ASSET screens the ID split with this share triggered (poison_rate when > 0)
    recon_examples: int = 6
    hard_images: int = 200  # hard clean images (textures, text, checkerboards, stripes) scored as a control; 0 = off
    victim_files: tuple[str, ...] = ()  # "[NAME=]ATTACK:TRIGGER=PATH": the user's victims, loaded instead of built
    clean_encoder: str | None = None  # the user's clean encoder: the control row of loaded victims
    normalization: Normalization = field(default_factory=Normalization)  # encoder input (mean/std, image size)
    train_data: str | None = None  # the user's labelled train set (``load_eval_data``); None = the demo data
    test_data: str | None = None  # ... and labelled test set, given together with train_data
    ood_data: str | None = None  # the user's OOD set (labels not needed)

    def __post_init__(self) -> None:
        # Paths are kept as strings: the config is written to results.json as it is.
        for name in ("clean_encoder", "train_data", "test_data", "ood_data"):
            if getattr(self, name) is not None:
                setattr(self, name, str(getattr(self, name)))
        self.victim_files = tuple(self.victim_files)
        if self.victims is None:
            self.victims = () if self.victim_files else DEFAULT_VICTIMS
        self.victims = tuple(self.victims)
        # not a field (so not in results.json): run_eval says so when the id regime alone was the default's choice
        self.regimes_defaulted = self.regimes is None
        if self.regimes is None:
            self.regimes = _default_regimes(self.train_data, self.ood_data)
        self.regimes, self.l2_regimes, self.seeds = tuple(self.regimes), tuple(self.l2_regimes), tuple(self.seeds)
        self._check_data()
        self._check_victims()
        self._check_scores()

    def _check_data(self) -> None:
        if (self.train_data is None) != (self.test_data is None):
            raise UserError("--train-data and --test-data go together (the decoder and probe train on one, "
                            "detection is measured on the other)")
        if self.ood_data is not None and self.train_data is None:
            raise UserError("--ood-data needs --train-data and --test-data")
        if not self.regimes or set(self.regimes) - set(REGIMES):
            raise UserError(f"--regimes takes id and/or ood, got {','.join(self.regimes)!r}")
        if set(self.l2_regimes) - set(REGIMES):
            raise UserError(f"--l2-regimes takes id and/or ood, got {','.join(self.l2_regimes)!r}")
        if "ood" in self.regimes and self.train_data is not None and self.ood_data is None:
            raise UserError("--regimes ood needs --ood-data (out-of-distribution training images)")

    def _check_victims(self) -> None:
        files = self.parsed_victim_files
        if files and not self.clean_encoder:
            raise UserError("victim files need --clean-encoder: every table has a control row, the same triggered "
                            "images scored by a clean encoder")
        if self.clean_encoder and not files:
            raise UserError("--clean-encoder is the control row of --victim-file victims; give at least one")
        clean = [Path(self.clean_encoder).expanduser()] if self.clean_encoder else []
        for path in [*(f.path for f in files), *clean]:
            if not path.is_file():
                raise UserError(f"{path}: encoder file not found")
        if not self.victims and not files:
            raise UserError("nothing to evaluate: give victims to build (--victim) and/or load (--victim-file)")
        names = [spec.name for spec in map(VictimSpec.parse, self.victims) if spec.attack != "clean"]
        names += [f.name for f in files]
        if len(set(names)) < len(names):
            raise UserError(f"victim names must be unique, got {names}; name them with NAME=ATTACK:TRIGGER=PATH")

    def _check_scores(self) -> None:
        if not self.seeds:
            raise UserError("--seeds needs at least one decoder seed")
        if not 0.0 < self.fpr < 1.0:
            raise UserError(f"--fpr is the target false-positive rate: in (0, 1), got {self.fpr}")
        if not 0.0 <= self.poison_rate < 1.0:
            raise UserError(f"--poison-rate must be in [0, 1), got {self.poison_rate}")
        # TrainConfig's own checks, before any victim is built
        TrainConfig(epochs=self.decoder_epochs, batch_size=self.decoder_batch, high_norm_share=self.high_norm_share,
                    precision=self.decoder_precision, lr_schedule=self.decoder_lr_schedule)
        if self.asset_epochs < 0 or not 0.0 < self.asset_poison_rate < 1.0:
            raise UserError(f"ASSET needs --asset-epochs >= 0 and a poison rate in (0, 1), got {self.asset_epochs} "
                            f"and {self.asset_poison_rate}")
        if self.hard_images < 0:
            raise UserError(f"--hard-images is a count of hard clean images (0 = no such control), got "
                            f"{self.hard_images}")
        if not 0.0 <= self.trim < 1.0:
            raise UserError(f"--trim is the share of patches the patch-robust score drops: in [0, 1), got {self.trim}")
        if self.relative_k < 0 or self.prototypes < max(1, self.relative_k):
            raise UserError(f"the relative score needs --relative-k >= 0 (0 = off) and --prototypes >= it, got "
                            f"{self.relative_k} and {self.prototypes}")
        size, patch = self.normalization.image_size, self.decoder["patch_size"]
        if size % patch or visible_count((size // patch) ** 2, TEST_MASK_RATIO) != 0:
            fits = [p for p in range(1, size + 1)
                    if size % p == 0 and visible_count((size // p) ** 2, TEST_MASK_RATIO) == 0]
            raise UserError(f"patch size {patch} does not fit image size {size}: eval needs a divisor of the image "
                            f"size that leaves no patch visible at test time (smallest: {fits[0]})")

    @property
    def parsed_victim_files(self) -> list[VictimFile]:
        """The user's victim files, parsed."""
        return [VictimFile.parse(text) for text in self.victim_files]

    def to_dict(self) -> dict:
        """JSON form."""
        return asdict(self)
