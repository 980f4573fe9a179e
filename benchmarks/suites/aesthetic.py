"""Aesthetic suite: mean aesthetic score (LAION predictor on real backends, the learned
shapes aesthetic model on shapes) over generated images; see benchmarks/suites/preference.py."""

from __future__ import annotations

from benchmarks.suites.preference import RewardSuite


class AestheticSuite(RewardSuite):
    name = "aesthetic"
