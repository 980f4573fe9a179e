"""Frechet distance against closed forms; clean-fid pipeline on a tiny TorchScript Inception."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from benchmarks.fid import INCEPTION_FILE, clean_fid_score, feature_statistics, frechet_distance, reference_statistics
from rtdmd.errors import UserError


def _rot(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


def test_diagonal_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.0])
    expected = 1 + 0 + 4 + (1 - 3) ** 2 + (2 - 1) ** 2 + (0.5 - 0) ** 2  # ||dmu||^2 + sum (sqrt a - sqrt b)^2
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, abs=1e-10)


def test_commuting_covariances_closed_form():
    q = _rot(5, 0)
    a, b = np.array([1.0, 2.0, 3.0, 0.5, 0.1]), np.array([4.0, 0.5, 3.0, 2.0, 0.0])
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu1, mu2 = np.ones(5), np.zeros(5)
    expected = 5 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, abs=1e-9)


def test_dimensions_without_variance_add_only_their_mean_term():
    s1, s2 = np.diag([4.0, 0.0, 1.0]), np.diag([1.0, 0.0, 0.0])
    s1[0, 2] = s1[2, 0] = 1.0
    mu1, mu2 = np.array([0.0, 3.0, 0.0]), np.zeros(3)
    # dimension 1 is dropped (zero variance in both); compare with the 2-d problem plus 3^2
    full = frechet_distance(mu1, s1, mu2, s2)
    sub = frechet_distance(mu1[[0, 2]], s1[np.ix_([0, 2], [0, 2])], mu2[[0, 2]], s2[np.ix_([0, 2], [0, 2])])
    assert full == pytest.approx(sub + 9.0, abs=1e-12)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    assert full == pytest.approx(ref, abs=1e-6)


def test_one_dimension_and_identity():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s
    assert frechet_distance([2.0], [[9.0]], [-1.0], [[4.0]]) == pytest.approx(9 + 1)
    s = np.cov(np.random.default_rng(1).normal(size=(50, 6)), rowvar=False)
    assert abs(frechet_distance(np.zeros(6), s, np.zeros(6), s)) < 1e-9


def test_general_pair_matches_scipy_sqrtm():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(40, 8)), rng.normal(size=(40, 8)) @ rng.normal(size=(8, 8))
    mu1, s1 = x.mean(0), np.cov(x, rowvar=False)
    mu2, s2 = y.mean(0), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)


def test_rank_deficient_covariances_stay_real_and_nonnegative():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(5, 20)), rng.normal(size=(5, 20)) + 0.1  # N < D: singular covariances
    d = frechet_distance(*feature_statistics(x), *feature_statistics(y))
    assert np.isfinite(d) and d >= 0
    assert abs(frechet_distance(*feature_statistics(x), *feature_statistics(x))) < 1e-8


def test_feature_statistics_hand_computed():
    mu, sigma = feature_statistics([[0, 0], [2, 0], [0, 2], [2, 2]])
    np.testing.assert_allclose(mu, [1, 1])
    np.testing.assert_allclose(sigma, [[4 / 3, 0], [0, 4 / 3]])  # unbiased (N - 1)
    with pytest.raises(UserError):
        feature_statistics([[1.0, 2.0]])
    with pytest.raises(UserError, match="shape"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# ------------------------------------------------------------------ clean-fid pipeline

# only 8 of the 2048 outputs are live: the rest have zero variance and are dropped exactly by
# frechet_distance, which keeps this test fast (a dense 2048-d eigh takes seconds here)
W = torch.zeros(2048, 3)
W[::256] = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))


class _Layers(torch.nn.Module):
    """Stands in for the Inception trunk: mean colour -> linear 2048-d feature."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2048)
        with torch.no_grad():
            self.lin.weight.copy_(W)
            self.lin.bias.zero_()

    def forward(self, x):
        return self.lin(x.mean(dim=(2, 3)))[:, :, None, None]


class _Inception(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = _Layers()

    def forward(self, x, return_features: bool = False):
        return self.layers(x)


@pytest.fixture()
def inception(tmp_path):
    path = tmp_path / "weights" / INCEPTION_FILE
    path.parent.mkdir()
    torch.jit.script(_Inception()).save(str(path))
    return path


def _folder(root, colours, size=(40, 30)):
    root.mkdir()
    for i, c in enumerate(colours):
        Image.new("RGB", size, tuple(int(v) for v in c)).save(root / f"{i:05d}.png")
    (root / "notes.txt").write_text("ignored")
    return root


def _features(colours):
    # clean-fid normalises [0, 255] -> [-1, 1] with (x - 128) / 128 before the trunk
    x = (torch.tensor(np.asarray(colours, np.float32)) - 128) / 128
    return (x @ W.T).double().numpy()


def test_clean_fid_folders_equal_hand_computed(tmp_path, inception):
    ca = np.random.default_rng(0).integers(0, 256, (6, 3))
    cb = np.random.default_rng(1).integers(0, 256, (5, 3))
    a, b = _folder(tmp_path / "a", ca), _folder(tmp_path / "b", cb, size=(299, 299))
    got = clean_fid_score(a, b, inception_path=inception, batch_size=4)
    ref = frechet_distance(*feature_statistics(_features(ca)), *feature_statistics(_features(cb)))
    assert got == pytest.approx(ref, rel=1e-4)
    assert clean_fid_score(a, a, inception_path=inception) == pytest.approx(0, abs=1e-3)
    # reference given as an .npz of (mu, sigma)
    mu, sigma = feature_statistics(_features(cb))
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)
    assert clean_fid_score(a, tmp_path / "ref.npz", inception_path=inception) == pytest.approx(ref, rel=1e-4)


def test_missing_inception_is_a_user_error_naming_the_file(tmp_path):
    a = _folder(tmp_path / "a", [[0, 0, 0], [255, 255, 255]])
    with pytest.raises(UserError, match=INCEPTION_FILE.replace(".", r"\.") + ".*place it at"):
        clean_fid_score(a, a, inception_path=tmp_path / "nowhere" / INCEPTION_FILE)


def test_missing_reference_and_bad_folders(tmp_path, inception):
    a = _folder(tmp_path / "a", [[0, 0, 0], [255, 255, 255]])
    with pytest.raises(UserError, match="coco2014_clean_train_256.npz"):
        reference_statistics("coco2014", "clean", 256, "train")
    with pytest.raises(UserError, match="resolution"):
        clean_fid_score(a, "coco2014", inception_path=inception)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        clean_fid_score(tmp_path / "empty", a, inception_path=inception)
    with pytest.raises(UserError, match="mode"):
        clean_fid_score(a, a, mode="legacy_pytorch", inception_path=inception)
