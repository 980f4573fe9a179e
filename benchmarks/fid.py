"""FID: the Frechet distance between Gaussians, feature statistics, and clean-fid over folders.

``frechet_distance`` is the one place the formula lives:
    d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})
(Heusel et al. 2017, eq. 6 / Dowson & Landau 1982). tr((S1 S2)^{1/2}) is computed as
tr((S1^{1/2} S2 S1^{1/2})^{1/2}) -- the same eigenvalues, but of a symmetric PSD matrix, so
two symmetric eigendecompositions replace scipy's general sqrtm (no complex parts, no
iteration, negative round-off eigenvalues clipped to 0).

``clean_fid_score`` reproduces clean-fid's ``mode="clean"`` pipeline with clean-fid's own
pieces (PIL float bicubic resize to 299, the TorchScript Inception of StyleGAN2-ADA) but
never lets it download: the Inception file and any reference statistics must be in place.
Only clean-fid modules that do not import torchvision are used, so this runs beside a CPU
torch.
clean-fid is imported when FID is computed (an optional extra).
"""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rtdmd.errors import UserError
from rtdmd.fileio import atomic_write_bytes

INCEPTION_FILE = "inception-2015-12-05.pt"
#: looked up in order; the second is where clean-fid itself keeps the file on Linux
INCEPTION_DIRS = (Path("~/.cache/rtdmd-bench/weights").expanduser(), Path("/tmp"))
#: clean-fid's accepted image extensions (cleanfid.utils.EXTENSIONS, case-insensitive)
IMAGE_EXTENSIONS = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}
#: clean-fid modes supported here ("legacy_pytorch" needs torchvision; reported numbers use "clean")
MODES = ("clean",)


def _psd(w: np.ndarray, d: int) -> np.ndarray:
    """Eigenvalues of a PSD matrix with round-off removed: those below the numerical-rank
    tolerance (d * eps * max|w|, as numpy.linalg.matrix_rank) are exact zeros, since their
    square roots (~sqrt(eps)) would otherwise add up over singular dimensions (N < D)."""
    tol = d * np.finfo(np.float64).eps * max(float(np.abs(w).max(initial=0.0)), np.finfo(np.float64).tiny)
    return np.where(w > tol, w, 0.0)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise UserError(
            f"FID statistics disagree in shape (mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}); "
            "compare statistics of the same feature extractor."
        )
    diff = mu1 - mu2
    # a dimension with zero variance in both (a zero row/column of each PSD matrix) adds only
    # its mean term: drop it exactly before the O(d^3) part
    keep = (np.diag(s1) != 0) | (np.diag(s2) != 0)
    if not keep.all():
        s1, s2, d = s1[np.ix_(keep, keep)], s2[np.ix_(keep, keep)], int(keep.sum())
    # symmetric square root of S1, then of S1^1/2 S2 S1^1/2 (both PSD)
    w1, v1 = np.linalg.eigh((s1 + s1.T) / 2)
    r1 = (v1 * np.sqrt(_psd(w1, d))) @ v1.T
    m = r1 @ ((s2 + s2.T) / 2) @ r1
    tr_sqrt = np.sqrt(_psd(np.linalg.eigvalsh((m + m.T) / 2), d)).sum()
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> (mean (D,), unbiased covariance (D, D)), as clean-fid / pytorch-fid."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise UserError(f"FID needs at least 2 feature vectors of shape (N, D); got {f.shape}.")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def save_fd_features(path: str | Path, units, features, ref_mu, ref_sigma) -> None:
    """One evaluation's per-image features for FD intervals, written atomically as an .npz of plain arrays:
    ``units`` (N, 2) (prompt index, image index), ``features`` (N, D), and the fixed reference statistics."""
    buf = io.BytesIO()
    np.savez(buf, units=np.asarray(units, np.int64).reshape(-1, 2), features=np.asarray(features, np.float64),
             ref_mu=np.asarray(ref_mu, np.float64), ref_sigma=np.asarray(ref_sigma, np.float64))
    atomic_write_bytes(path, buf.getvalue())


def load_fd_features(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays save_fd_features wrote (no pickled objects are read), checked for consistent shapes."""
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in ("units", "features", "ref_mu", "ref_sigma")}
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"FD feature file {path} is unreadable ({e}); delete it and score the checkpoint again.") from None
    n, d = out["features"].shape if out["features"].ndim == 2 else (-1, -1)
    if out["units"].shape != (n, 2) or out["ref_mu"].shape != (d,) or out["ref_sigma"].shape != (d, d):
        raise UserError(f"FD feature file {path} has inconsistent shapes; delete it and score the checkpoint again.")
    return out


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside `folder` (flat, sorted by name)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"FID image folder {folder} does not exist; pass a folder of generated images.")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UserError(f"FID image folder {folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) at its top level; point FID at a flat folder.")
    return files


def find_inception(inception_path: str | Path | None = None) -> Path:
    """The TorchScript Inception file; UserError (never a download) when absent."""
    candidates = [Path(inception_path).expanduser()] if inception_path else [d / INCEPTION_FILE for d in INCEPTION_DIRS]
    for c in candidates:
        if c.is_dir() and (c / INCEPTION_FILE).is_file():
            return c / INCEPTION_FILE
        if c.is_file():
            return c
    where = " or ".join(str(c if c.suffix else c / INCEPTION_FILE) for c in candidates)
    raise UserError(
        f"clean-fid's Inception weights {INCEPTION_FILE} are missing (looked at {where}); download it on a machine "
        f"with network (the StyleGAN2-ADA metrics file clean-fid fetches) and place it at {candidates[0]}."
    )


def _load_cleanfid():
    try:
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer
    except ImportError:
        raise UserError("clean-fid is not installed; run `pip install 'rtdmd-bench[scorers]'` (or `pip install clean-fid`).") from None
    return InceptionV3W, build_resizer


class InceptionFeatures:
    """clean-fid's feature extractor, loaded once: images (files or uint8 arrays) -> (N, 2048)."""

    def __init__(self, mode: str = "clean", device: str | torch.device = "cpu", inception_path=None, batch_size: int = 32):
        if mode not in MODES:
            raise UserError(f"unknown FID mode '{mode}'; choose one of {', '.join(MODES)}.")
        InceptionV3W, build_resizer = _load_cleanfid()
        path = find_inception(inception_path)
        self.mode = mode
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.resize = build_resizer(mode)
        # InceptionV3W joins the folder with its fixed file name; download=False never fetches
        if path.name != INCEPTION_FILE:
            raise UserError(f"clean-fid loads the Inception file by its name; rename {path} to {INCEPTION_FILE}.")
        self.model = InceptionV3W(str(path.parent), download=False, resize_inside=False).to(self.device).eval()

    def _to_input(self, arr: np.ndarray) -> torch.Tensor:
        # clean-fid ResizeDataset: float32 [0, 255] HWC from the resizer -> CHW tensor
        x = self.resize(arr)
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).permute(2, 0, 1)

    @torch.no_grad()
    def __call__(self, images) -> np.ndarray:
        """images: iterable of paths or (H, W, 3) uint8 arrays."""
        feats, batch = [], []

        def flush():
            if batch:
                feats.append(self.model(torch.stack(batch).to(self.device)).double().cpu().numpy())
                batch.clear()

        for item in images:
            arr = item if isinstance(item, np.ndarray) else np.array(Image.open(item).convert("RGB"))
            batch.append(self._to_input(arr))
            if len(batch) == self.batch_size:
                flush()
        flush()
        return np.concatenate(feats) if feats else np.zeros((0, 2048))


def reference_statistics(spec: str, mode: str = "clean", res: int | str | None = None, split: str = "train"):
    """(mu, sigma) from an .npz file (keys mu, sigma) or a clean-fid stats name already on disk."""
    p = Path(spec).expanduser()
    if p.suffix == ".npz":
        if not p.is_file():
            raise UserError(f"FID reference statistics {p} not found; pass an existing .npz with keys mu and sigma.")
        stats = np.load(p)
        return stats["mu"], stats["sigma"]
    found = importlib.util.find_spec("cleanfid")
    if found is None:
        _load_cleanfid()
    if res is None:
        raise UserError(f"FID reference '{spec}' is a clean-fid statistics name; give its resolution too (e.g. 256).")
    folder = Path(found.submodule_search_locations[0]) / "stats"
    res_s = "na" if split == "custom" else str(res)
    f = folder / f"{spec}_{mode}_{split}_{res_s}.npz".lower()
    if not f.is_file():
        raise UserError(f"clean-fid statistics '{f.name}' are not on disk; place the file at {f} (clean-fid would download it).")
    stats = np.load(f)
    return stats["mu"], stats["sigma"]


def clean_fid_score(
    folder_a: str | Path,
    reference: str | Path,
    mode: str = "clean",
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    inception_path: str | Path | None = None,
    dataset_res: int | None = None,
    dataset_split: str = "train",
) -> float:
    """FID between a flat image folder and `reference`: another flat folder, an .npz of
    (mu, sigma), or a clean-fid statistics name (with dataset_res) already on disk."""
    files_a = list_images(folder_a)
    ref = Path(reference).expanduser()
    if not ref.is_dir():
        mu2, s2 = reference_statistics(str(reference), mode, dataset_res, dataset_split)
    extractor = InceptionFeatures(mode, device, inception_path, batch_size)
    mu1, s1 = feature_statistics(extractor(files_a))
    if ref.is_dir():
        mu2, s2 = feature_statistics(extractor(list_images(ref)))
    return frechet_distance(mu1, s1, mu2, s2)
