"""The shapes-world detector: colour unmixing, connected components, SDF template fitting.

How it works (no learned weights):
1. Unmixing. Every pixel p is read as a mix of the background b and one palette colour
   c_k: p = b + a (c_k - b). Per colour the coverage a_k is the projection of p - b on
   c_k - b, and the colour whose ray passes closest to p labels the pixel. Anti-aliased
   and blurred edges are such mixes, so they get the right colour and a soft coverage.
2. Segmentation. Pixels with coverage >= 0.5 form 4-connected components; a component
   whose core holds two or more sizeable colours (touching objects) is split by colour.
3. Fitting. For each part, the coverage mass and centroid (both unchanged by blur) give,
   per class, the size and centre of that class's shape; the world's own SDF renders the
   candidate at a few sizes and Gaussian blurs, and the fit quality is
   q = 1 - (sum (obs - tmpl)^2 - n sigma^2) / sum tmpl^2, where n sigma^2 is the squared
   pixel noise expected over the window (measured on background pixels far from any
   object), so noise does not lower q. The best of all six classes is the label.
4. Score = clip((q - q_low) / (q_high - q_low)) x clip((q - q_runner_up) / margin)
   x clip((max_blur - blur) / (max_blur - sharp_blur)) x clip((size - lo/2) / (0.3 lo)):
   a shape fits well, fits much better than any other class, is not blurred past
   recognition, and is not a speck far below the world's smallest size lo. Defaults were
   calibrated on renders and blobs (benchmarks/perf/bench_detector.py): blurred, noisy
   renders clear GenEval's 0.9 counting threshold; shapeless blobs mostly stay below 0.3.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from benchmarks.geneval.detection import Detection
from rtdmd.errors import UserError
from rtdmd.world.shapes import ALL_CLASSES, CROSS_ARM, GENEVAL_COLORS, PALETTE, RING_BAND, WorldSpec, coverage, shape_sdf

VERSION = "1"

# Area of each class's shape as a fraction of size^2 (closed forms of the SDFs in rtdmd.world.shapes).
AREA_FACTOR = {
    "circle": np.pi / 4,
    "square": 1.0,
    "diamond": 0.5,
    "triangle": 0.5,
    "cross": 2 * CROSS_ARM - CROSS_ARM**2,
    "ring": np.pi / 4 * (1 - (1 - 2 * RING_BAND) ** 2),
}
# Centroid minus box centre along y, as a fraction of size (the triangle's centroid is h/3 below).
CENTROID_DY = {"triangle": 1 / 6}

_FOUR = ndimage.generate_binary_structure(2, 1)


def fit_quality(obs: torch.Tensor, tmpl: torch.Tensor, noise_sse: float) -> torch.Tensor:
    """q = 1 - (sum (obs - tmpl)^2 - noise_sse) / sum tmpl^2 over the last two dims.

    noise_sse is the expected sum of squared noise over the window, so q of a perfect
    template on a noisy image is 1 on average rather than lowered by the noise.
    """
    err = ((obs - tmpl) ** 2).sum((-1, -2)) - noise_sse
    return 1.0 - err / (tmpl**2).sum((-1, -2)).clamp(min=1e-6)


class ShapesDetector:
    """Detector protocol (benchmarks.geneval.detection) for the shapes world."""

    def __init__(
        self,
        spec: WorldSpec | None = None,
        q_low: float = 0.87,
        q_high: float = 0.96,
        distinct_margin: float = 0.008,
        size_factors: tuple[float, ...] = (0.94, 1.0, 1.06),
        blurs: tuple[float, ...] = (0.0, 0.6, 0.9, 1.2, 1.8, 2.5),
        sharp_blur: float = 1.2,
        max_blur: float = 2.4,
    ):
        self.spec = spec or WorldSpec()
        self.classes = ALL_CLASSES  # always all six, so scores mean the same in every world
        self.q_low, self.q_high = q_low, q_high
        self.distinct_margin = distinct_margin
        self.size_factors = tuple(size_factors)
        self.blurs = tuple(blurs)
        self.sharp_blur, self.max_blur = sharp_blur, max_blur
        r = int(np.ceil(3 * max(self.blurs)))
        taps = torch.arange(-r, r + 1, dtype=torch.float32)
        kernels = [
            (taps == 0).float() if b == 0 else torch.exp(-0.5 * (taps / b) ** 2) for b in self.blurs
        ]
        self._kernel = torch.stack([k / k.sum() for k in kernels])  # (E, 2r + 1)
        self.bg = np.asarray(self.spec.background, dtype=np.float32)
        self.palette = np.asarray([PALETTE[c] for c in GENEVAL_COLORS], dtype=np.float32)  # (10, 3)
        self.rays = self.palette - self.bg  # (10, 3)
        self.ray_norm2 = (self.rays**2).sum(1)
        lo = self.spec.size_range[0]
        # the smallest object of the world covers about lo^2 / 2 px; a fifth of lo^2 is a fragment
        self.min_area = 0.2 * lo * lo
        self.name = (
            f"shapes-detector-v{VERSION}(q={q_low:g}-{q_high:g},min_size={lo:g},"
            f"bg={'/'.join(f'{c:g}' for c in self.spec.background)})"
        )

    # ------------------------------------------------------------------ pixel model

    def _unmix(self, image: np.ndarray):
        """Per pixel and colour: coverage (unclamped), clamped coverage and residual distance."""
        if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8):
            raise UserError(
                f"the shapes detector needs an (H, W, 3) uint8 image, got "
                f"{getattr(image, 'shape', None)} {getattr(image, 'dtype', type(image).__name__)}; convert it first."
            )
        d = image.astype(np.float32) / 255.0 - self.bg  # (H, W, 3)
        proj = d @ self.rays.T / self.ray_norm2  # (H, W, 10)
        a = np.clip(proj, 0.0, 1.0)
        resid = np.sqrt(((d[:, :, None, :] - a[..., None] * self.rays) ** 2).sum(-1))  # (H, W, 10)
        return proj, a, resid

    # ------------------------------------------------------------------ segmentation

    def _parts(self, a: np.ndarray, resid: np.ndarray) -> tuple[list[tuple[np.ndarray, int]], np.ndarray]:
        """(mask, colour index) per object part, and an owner map of every pixel within 3 px of a component.

        owner: j for part j, -2 for a dropped fragment, -1 for background far from everything.
        """
        H, W = a.shape[:2]
        lab = resid.argmin(-1)
        alpha = np.take_along_axis(a, lab[..., None], -1)[..., 0]
        comps, n = ndimage.label(alpha >= 0.5, structure=_FOUR)
        owner = np.full((H, W), -1, dtype=np.int64)
        parts: list[tuple[np.ndarray, int]] = []
        for i in range(n):
            comp = comps == i + 1
            owner[comp] = -2
            area = int(comp.sum())
            if area < self.min_area:
                continue
            core = comp & (alpha >= 0.75)
            if core.sum() < 0.25 * area:
                core = comp
            counts = np.bincount(lab[core], minlength=10)
            dominant = [k for k in np.argsort(-counts) if counts[k] >= max(0.5 * self.min_area, 0.2 * core.sum())]
            if len(dominant) >= 2:
                # touching objects of different colours: assign pixels to the nearest dominant colour
                sub = np.asarray(dominant)[resid[..., dominant].argmin(-1)]
                pieces = []
                for k in dominant:
                    sc, m = ndimage.label(comp & (sub == k), structure=_FOUR)
                    for j in range(1, m + 1):
                        piece = sc == j
                        if piece.sum() >= self.min_area:
                            pieces.append((piece, int(k)))
                if len(pieces) >= 2:
                    parts.extend(pieces)
                    continue
            parts.append((comp, int(dominant[0]) if dominant else int(counts.argmax())))
        for j, (m, _) in enumerate(parts):
            owner[m] = j
        # Soft edges below the 0.5 cut belong to the nearest component (within 3 px), so that
        # a neighbour's fringe is never counted against this object's fit.
        if (owner != -1).any():
            dist, (iy, ix) = ndimage.distance_transform_edt(owner == -1, return_indices=True)
            owner = np.where(dist <= 3.0, owner[iy, ix], -1)
        return parts, owner

    # ------------------------------------------------------------------ fitting

    def _noise_moments(self, image: np.ndarray, owner: np.ndarray) -> np.ndarray:
        """Per-channel mean square of (pixel - background) on pixels more than 3 px from any component."""
        d = image[owner == -1].astype(np.float64) / 255.0 - self.bg
        if len(d) < 16:
            return np.zeros(3)
        return (d**2).mean(0)

    def _blur(self, t: torch.Tensor) -> torch.Tensor:
        """(M, 1, h, w) crisp templates -> (M, E, h, w), one separable Gaussian per width in self.blurs."""
        r = self._kernel.shape[-1] // 2
        E = len(self.blurs)
        x = torch.nn.functional.conv2d(t, self._kernel.view(E, 1, 1, -1), padding=(0, r))
        return torch.nn.functional.conv2d(x, self._kernel.view(E, 1, -1, 1), padding=(r, 0), groups=E)

    def _fit(self, j: int, mask: np.ndarray, k: int, proj: np.ndarray, owner: np.ndarray, noise: np.ndarray):
        """(class, score, box, q, runner-up q) for part j of colour k, or None if it holds no mass."""
        H, W = mask.shape
        ys, xs = np.nonzero(mask)
        pad = 4
        y0, y1 = max(ys.min() - pad, 0), min(ys.max() + pad + 1, H)
        x0, x1 = max(xs.min() - pad, 0), min(xs.max() + pad + 1, W)
        own = owner[y0:y1, x0:x1]
        free = (own == -1) | (own == j)
        near = ndimage.binary_dilation(mask[y0:y1, x0:x1], iterations=2) & free
        win = np.where(free, proj[y0:y1, x0:x1, k], 0.0)
        obs_near = np.where(near, win, 0.0)
        mass = float(obs_near.sum())
        if mass <= 1.0:
            return None
        gy, gx = np.mgrid[y0:y1, x0:x1].astype(np.float64) + 0.5
        mx, my = float((obs_near * gx).sum() / mass), float((obs_near * gy).sum() / mass)
        # expected squared noise of this colour's coverage per pixel, removed from the error below
        ray = self.rays[k].astype(np.float64)
        noise_a2 = float((noise * ray**2).sum() / (ray**2).sum() ** 2)
        free_t = torch.from_numpy(free.astype(np.float32))
        obs = torch.from_numpy(win.astype(np.float32))
        n_free = float(free.sum())
        xg = torch.from_numpy(gx[0].astype(np.float32)).view(1, 1, 1, -1)
        yg = torch.from_numpy(gy[:, 0].astype(np.float32)).view(1, 1, -1, 1)
        sf = torch.tensor(self.size_factors, dtype=torch.float32)
        crisp, geom = [], []
        for cls in self.classes:
            s0 = float(np.sqrt(mass / AREA_FACTOR[cls]))
            sizes = (s0 * sf).view(-1, 1, 1, 1)  # (S, 1, 1, 1)
            cy = my - CENTROID_DY.get(cls, 0.0) * sizes
            crisp.append(coverage(shape_sdf(cls, xg - mx, yg - cy, sizes), self.spec.aa_width))
            geom.append(sizes.view(-1))
        tmpl = self._blur(torch.cat(crisp)) * free_t  # (C * S, E, h, w); other objects' pixels excluded
        quality = fit_quality(obs, tmpl, n_free * noise_a2).view(len(self.classes), len(sf), -1)
        best: dict[str, tuple[float, float, float, float, float]] = {}
        for c, cls in enumerate(self.classes):
            q = quality[c]
            flat = int(q.argmax())
            s = float(geom[c][flat // q.shape[1]])
            blur = self.blurs[flat % q.shape[1]]
            best[cls] = (float(q.view(-1)[flat]), mx, my - CENTROID_DY.get(cls, 0.0) * s, s, blur)
        ranked = sorted(best.items(), key=lambda kv: -kv[1][0])
        cls, (q_best, cx, cy, s, blur) = ranked[0]
        q_second = ranked[1][1][0] if len(ranked) > 1 else -1.0
        score = self.score(q_best, q_second, blur, s)
        return cls, score, (cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2), q_best, q_second

    def score(self, q_best: float, q_second: float, blur: float, size: float) -> float:
        """Confidence in [0, 1]: fits well, much better than the runner-up class, is not a blurred
        blob, and is not a speck (full credit from 0.8, none below 0.5 of the world's smallest size)."""
        fit = np.clip((q_best - self.q_low) / (self.q_high - self.q_low), 0.0, 1.0)
        distinct = np.clip((q_best - q_second) / self.distinct_margin, 0.0, 1.0)
        sharp = np.clip((self.max_blur - blur) / (self.max_blur - self.sharp_blur), 0.0, 1.0)
        lo = self.spec.size_range[0]
        big = np.clip((size - 0.5 * lo) / (0.3 * lo), 0.0, 1.0)
        return float(fit * distinct * sharp * big)

    # ------------------------------------------------------------------ protocol

    def detect(self, image: np.ndarray) -> list[Detection]:
        """All detections, any class, by decreasing score (shapeless blobs get low scores)."""
        proj, a, resid = self._unmix(image)
        parts, owner = self._parts(a, resid)
        noise = self._noise_moments(image, owner)
        dets = []
        for j, (mask, k) in enumerate(parts):
            fit = self._fit(j, mask, k, proj, owner, noise)
            if fit is None:
                continue
            cls, score, box = fit[:3]
            dets.append(Detection(label=cls, score=score, box=tuple(float(v) for v in box), mask=mask))
        dets.sort(key=lambda d: -d.score)
        return dets

    def classify_colors(self, image: np.ndarray, detections: list[Detection], class_name: str) -> list[str]:
        """Nearest palette colour of each object's strongest pixels (median of the more opaque half)."""
        img = image.astype(np.float32) / 255.0
        out = []
        for det in detections:
            m = det.mask
            if m is None:
                x0, y0, x1, y1 = (int(round(v)) for v in det.box)
                m = np.zeros(img.shape[:2], dtype=bool)
                m[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = True
            px = img[m]
            if len(px) == 0:
                out.append(GENEVAL_COLORS[0])
                continue
            # edge pixels are mixed with the grey background: keep the half farthest from it
            dist = np.linalg.norm(px - self.bg, axis=1)
            px = px[dist >= np.median(dist)]
            med = np.median(px, axis=0)
            out.append(GENEVAL_COLORS[int(np.linalg.norm(self.palette - med, axis=1).argmin())])
        return out
