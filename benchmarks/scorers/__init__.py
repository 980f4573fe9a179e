"""Real scorers (HPSv2.1, ImageReward, PickScore, CLIPScore, LAION aesthetic) behind the Reward protocol."""

from benchmarks.scorers.registry import get_scorer, scorer_names

__all__ = ["get_scorer", "scorer_names"]
