"""benchmarks/grpo_signal.py: the signal-to-noise formulas on hand numbers, and its bad input."""

import math

import pytest
import torch

from benchmarks import grpo_signal as G


def test_rollouts_for_cosine_one_half_on_hand_numbers():
    # c = 0.2 at n = 32: tr(Sigma)/n = 4 |mu|^2, so |mu|^2 = tr(Sigma)/n' at n' = 4 * 32 = 128
    assert G.signal_of([0.1, 0.3], 32) == pytest.approx(128.0)
    # the formula inverts the cosine of two means of n i.i.d. terms: c(n) = s / (s + v / n)
    s, v = 0.5, 20.0
    c = s / (s + v / 16)
    assert G.signal_of([c], 16) == pytest.approx(v / s)
    assert G.signal_of([0.0, -0.1], 32) is None


def test_group_stats_on_hand_numbers():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0])  # groups of 3: (1, 1, 1) flat; (0, 1, 0) std sqrt(2)/3
    flat, spread = G.group_stats(r, 3)
    assert flat == pytest.approx(0.5)
    assert spread == pytest.approx((0.0 + math.sqrt(2) / 3) / 2)


def test_batch_bootstrap_brackets_the_mean_cosine():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(200, generator=g)
    grads = [mu + 2.0 * torch.randn(200, generator=g) for _ in range(6)]
    lo, hi = G.batch_bootstrap(G.cosine_matrix(grads), 500)
    pairs = [G.cosine(a, b) for i, a in enumerate(grads) for b in grads[i + 1:]]
    assert lo <= sum(pairs) / len(pairs) <= hi
    identical = [mu.clone() for _ in range(3)]
    assert G.batch_bootstrap(G.cosine_matrix(identical), 100) == pytest.approx((1.0, 1.0))


def test_one_batch_is_refused_with_exit_2(capsys):
    assert G.main(["--batches", "1"]) == 2
    assert "at least 2" in capsys.readouterr().err


def test_a_missing_init_checkpoint_is_one_sentence_and_exit_2(tmp_path, capsys):
    assert G.main(["--batches", "2", "--init", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nowhere" in err
