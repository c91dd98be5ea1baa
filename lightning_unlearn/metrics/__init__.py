"""Utility (ranking) and completeness (forgetting) metrics."""

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
from lightning_unlearn.metrics.ranking import FullRankingMetrics, ranking_metrics

__all__ = [
    "FullRankingMetrics", "completeness_report", "deleted_row_statistics", "gap_closed", "item_side_statistics",
    "membership_inference_auc", "param_distance_rel", "ranking_metrics", "score_distance_rel", "topk_overlap",
]
