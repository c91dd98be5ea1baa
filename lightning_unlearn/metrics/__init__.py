"""Completeness (forgetting) metrics, and the utility (ranking) metrics re-exported from :mod:`lightning_unlearn.ranking`.

The ranking metrics live below the models (every model logs them); completeness compares
models, so it sits above them.
"""

from lightning_unlearn.metrics.completeness import (
    completeness_report,
    deleted_row_statistics,
    gap_closed,
    item_side_statistics,
    membership_inference_auc,
    param_distance_rel,
    score_distance_rel,
    topk_overlap,
)
from lightning_unlearn.ranking import FullRankingMetrics, ranking_metrics

__all__ = [
    "FullRankingMetrics", "completeness_report", "deleted_row_statistics", "gap_closed", "item_side_statistics",
    "membership_inference_auc", "param_distance_rel", "ranking_metrics", "score_distance_rel", "topk_overlap",
]
