"""Baseline detectors DeDe is compared with: embedding norm, kNN distance, ASSET (sample-level), DECREE (model-level)."""

from dede_rt.research.baselines.asset import AssetConfig, asset_scores
from dede_rt.research.baselines.decree import DecreeConfig, DecreeResult, invert_trigger
from dede_rt.research.baselines.simple import embedding_norm_scores, knn_distance_scores

__all__ = ["embedding_norm_scores", "knn_distance_scores", "invert_trigger", "DecreeConfig", "DecreeResult",
           "asset_scores", "AssetConfig"]
