"""Utility (ranking) metrics; completeness metrics join here later."""

from lightning_unlearn.metrics.ranking import FullRankingMetrics, ranking_metrics

__all__ = ["FullRankingMetrics", "ranking_metrics"]
