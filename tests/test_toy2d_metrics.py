import math

import pytest
import torch

from benchmarks.toy2d_metrics import matches_teacher, mmd, mmd2, rbf_kernel


def test_rbf_kernel_hand_values():
    x = torch.tensor([[0.0, 0.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    k = rbf_kernel(x, y, bandwidth=1.0)
    assert torch.allclose(k, torch.tensor([[math.exp(-0.5), math.exp(-2.0)]], dtype=torch.float64))
    k2 = rbf_kernel(x, y, bandwidth=[1.0, 2.0])  # sum over bandwidths
    assert k2[0, 0].item() == pytest.approx(math.exp(-0.5) + math.exp(-1 / 8))


def test_mmd2_hand_value():
    # x = {0}, y = {1} in 1-D, h = 1: k(x,x) = k(y,y) = 1, k(x,y) = e^-0.5 -> MMD^2 = 2 - 2 e^-0.5
    x, y = torch.tensor([[0.0]]), torch.tensor([[1.0]])
    assert mmd2(x, y, 1.0) == pytest.approx(2 - 2 * math.exp(-0.5))
    assert mmd(x, y, 1.0) == pytest.approx((2 - 2 * math.exp(-0.5)) ** 0.5)
    # two points each: x = {0, 2}, y = {0, 0}
    x2, y2 = torch.tensor([[0.0], [2.0]]), torch.tensor([[0.0], [0.0]])
    e2 = math.exp(-2.0)
    kxx = (1 + 1 + 2 * e2) / 4
    kyy = 1.0
    kxy = (1 + 1 + e2 + e2) / 4
    assert mmd2(x2, y2, 1.0) == pytest.approx(kxx + kyy - 2 * kxy)


def test_matches_teacher_separates_shifted_samples():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(500, 2, generator=g), torch.randn(500, 2, generator=g)
    same = torch.randn(500, 2, generator=g)
    shifted = torch.randn(500, 2, generator=g) + torch.tensor([1.0, 0.0])
    assert matches_teacher(same, a, b)[0]
    ok, m, ref = matches_teacher(shifted, a, b)
    assert not ok and m > 2 * ref
    with pytest.raises(ValueError):
        matches_teacher(same[:10], a, b)
