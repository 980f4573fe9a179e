"""The learned shapes reward networks and the shapes encoder: small differentiable torch networks.

- PreferenceNet r(image, prompt) (the HPS / PickScore analogue): a CNN whose feature maps
  are modulated by the prompt (FiLM, Perez et al. 2018) from a bidirectional GRU over the
  caption grammar's words, so word order ("a circle left of a square") matters.
- AestheticNet a(image) (the LAION aesthetic analogue): the same CNN without the prompt.
- ShapesEncoder (the Inception analogue for FD-shapes): a CNN trained on renders to
  predict per-class and per-colour object counts and a 3x3 occupancy grid; its
  penultimate layer is the feature space.

Both reward networks are trained on Bradley-Terry pairs (benchmarks.shapes.pairs), whose
maximum-likelihood logit is (o_a - o_b) / T, so ``scale`` (= T) times the raw output plus
``offset`` (a running calibration against the oracle during training) is in oracle units:
the learned reward and the oracle can be read side by side (a gap is reward hacking).
Bundles of trained networks: benchmarks.shapes.reward_models.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rtdmd.backends.shapes import WordTokenizer
from rtdmd.errors import UserError
from rtdmd.world.shapes import GENEVAL_COLORS, WorldSpec, vocabulary

NETWORKS = ("preference", "aesthetic", "encoder")
MAX_COUNT = 4  # count heads classify 0..MAX_COUNT objects
GRID = 3  # occupancy grid of object centres


# ---------------------------------------------------------------------------- building blocks


def _coords(x: torch.Tensor) -> torch.Tensor:
    """Two channels with x and y in [-1, 1] (CoordConv), so positions are visible to the convolutions."""
    B, _, H, W = x.shape
    ys = torch.linspace(-1, 1, H, device=x.device, dtype=x.dtype).view(1, 1, H, 1).expand(B, 1, H, W)
    xs = torch.linspace(-1, 1, W, device=x.device, dtype=x.dtype).view(1, 1, 1, W).expand(B, 1, H, W)
    return torch.cat([xs, ys], 1)


class ConvTrunk(nn.Module):
    """Five 3x3 conv blocks (widths w, 2w, 2w, 4w, 4w; two stride-2), optional FiLM per block."""

    def __init__(self, width: int = 32, cond_dim: int = 0):
        super().__init__()
        self.channels = [width, 2 * width, 2 * width, 4 * width, 4 * width]
        strides = [1, 2, 1, 2, 1]
        cin = 5
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        for c, s in zip(self.channels, strides):
            self.convs.append(nn.Conv2d(cin, c, 3, s, 1))
            self.norms.append(nn.GroupNorm(min(8, c), c))
            cin = c
        self.film = nn.Linear(cond_dim, 2 * sum(self.channels)) if cond_dim else None
        if self.film is not None:  # start as the identity modulation
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)

    @property
    def out_channels(self) -> int:
        return self.channels[-1]

    def forward(self, images: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        # background #999999 maps to 0; object colours to about +-2
        h = torch.cat([(images - 0.6) / 0.3, _coords(images)], 1)
        mods = self.film(cond).split([c for c in self.channels for _ in (0, 1)], dim=1) if self.film is not None else None
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            h = norm(conv(h))
            if mods is not None:
                gamma, beta = mods[2 * i], mods[2 * i + 1]
                h = h * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]
            h = F.silu(h)
        return h


def _pool(h: torch.Tensor) -> torch.Tensor:
    return torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)


class PromptEncoder(nn.Module):
    """Word embeddings + a bidirectional GRU; the two final states, concatenated."""

    def __init__(self, vocab_size: int, embed_dim: int = 32, hidden: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.gru = nn.GRU(embed_dim, hidden, batch_first=True, bidirectional=True)
        self.out_dim = 2 * hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        lengths = attention_mask.sum(1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(input_ids), lengths, batch_first=True, enforce_sorted=False)
        _, h = self.gru(packed)  # (2, B, hidden)
        return torch.cat([h[0], h[1]], 1)


class _Calibrated(nn.Module):
    """score = scale * raw + offset, in oracle units (see the module docstring)."""

    def _init_calibration(self, temperature: float):
        self.register_buffer("scale", torch.tensor(float(temperature)))
        self.register_buffer("offset", torch.tensor(0.0))

    @torch.no_grad()
    def calibrate(self, raw: torch.Tensor, target: torch.Tensor, momentum: float) -> None:
        """offset <- momentum * offset + (1 - momentum) * mean(target - scale * raw)."""
        est = (target.to(raw.dtype) - self.scale * raw.detach()).mean()
        self.offset.mul_(momentum).add_((1 - momentum) * est)


class PreferenceNet(_Calibrated):
    """r(image, prompt): FiLM-conditioned CNN; forward returns the raw Bradley-Terry logit (B,)."""

    def __init__(self, vocab_size: int, width: int = 32, embed_dim: int = 32, text_hidden: int = 64,
                 temperature: float = 0.05):
        super().__init__()
        self.text = PromptEncoder(vocab_size, embed_dim, text_hidden)
        self.cond = nn.Sequential(nn.Linear(self.text.out_dim, self.text.out_dim), nn.SiLU())
        self.trunk = ConvTrunk(width, self.text.out_dim)
        c = 2 * self.trunk.out_channels
        self.head = nn.Sequential(nn.Linear(c, c // 2), nn.SiLU(), nn.Linear(c // 2, 1))
        self._init_calibration(temperature)

    def forward(self, images, input_ids, attention_mask):
        cond = self.cond(self.text(input_ids, attention_mask))
        return self.head(_pool(self.trunk(images, cond)))[:, 0]


class AestheticNet(_Calibrated):
    """a(image): the preference CNN without the prompt; forward returns the raw logit (B,)."""

    def __init__(self, width: int = 32, temperature: float = 0.05):
        super().__init__()
        self.trunk = ConvTrunk(width)
        c = 2 * self.trunk.out_channels
        self.head = nn.Sequential(nn.Linear(c, c // 2), nn.SiLU(), nn.Linear(c // 2, 1))
        self._init_calibration(temperature)

    def forward(self, images):
        return self.head(_pool(self.trunk(images)))[:, 0]


class SceneReader(nn.Module):
    """Reads a scene from an image: per (class, colour) object counts and per-class counts (0..MAX_COUNT, as
    logits) and per-class centroids in [-1, 1]; trained on renders with the world's ground truth (reader_loss)."""

    def __init__(self, n_classes: int, width: int = 32, hidden: int = 128):
        super().__init__()
        self.n_classes, self.n_colors, self.hidden_dim = n_classes, len(GENEVAL_COLORS), hidden
        self.trunk = ConvTrunk(width)
        self.proj = nn.Linear(2 * self.trunk.out_channels, hidden)
        m = MAX_COUNT + 1
        self.color_class_counts = nn.Linear(hidden, n_classes * self.n_colors * m)
        self.class_counts = nn.Linear(hidden, n_classes * m)
        self.centroids = nn.Linear(hidden, n_classes * 2)

    @property
    def out_dim(self) -> int:
        """Width of read(): count distributions and centroids, flattened."""
        m = MAX_COUNT + 1
        return self.n_classes * (self.n_colors * m + m + 2)

    def hidden(self, images: torch.Tensor) -> torch.Tensor:
        """The features every head reads (B, hidden)."""
        return F.silu(self.proj(_pool(self.trunk(images))))

    def heads(self, f: torch.Tensor) -> dict[str, torch.Tensor]:
        B, C, K, m = len(f), self.n_classes, self.n_colors, MAX_COUNT + 1
        return {"color_class_counts": self.color_class_counts(f).view(B, C, K, m),
                "class_counts": self.class_counts(f).view(B, C, m),
                "centroids": torch.tanh(self.centroids(f)).view(B, C, 2)}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads(self.hidden(images))

    def read(self, images: torch.Tensor, with_hidden: bool = False) -> torch.Tensor:
        """The reading, flattened: count distributions and centroids (out_dim), then the hidden features if asked."""
        f = self.hidden(images)
        out = self.heads(f)
        parts = [out["color_class_counts"].softmax(-1).flatten(1), out["class_counts"].softmax(-1).flatten(1),
                 out["centroids"].flatten(1)]
        return torch.cat(parts + [f] if with_hidden else parts, 1)


def reader_targets(scenes, spec: WorldSpec) -> dict[str, torch.Tensor]:
    """SceneReader's ground truth from renderer scenes: counts clamped to MAX_COUNT, centroids in [-1, 1] (0 and
    masked out for absent classes)."""
    B, C, K, S = len(scenes), len(spec.classes), len(GENEVAL_COLORS), spec.image_size
    cc = torch.zeros(B, C, K, dtype=torch.long)
    pos = torch.zeros(B, C, 2)
    for b, scene in enumerate(scenes):
        for o in scene.objects:
            if o.cls in spec.classes:
                c = spec.classes.index(o.cls)
                cc[b, c, GENEVAL_COLORS.index(o.color)] += 1
                pos[b, c] += torch.tensor([o.cx / S * 2 - 1, o.cy / S * 2 - 1])
    n = cc.sum(2)
    return {"color_class_counts": cc.clamp(max=MAX_COUNT), "class_counts": n.clamp(max=MAX_COUNT),
            "centroids": pos / n.clamp(min=1)[..., None], "present": (n > 0).float()}


def reader_loss(out: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Cross-entropy on both count heads plus the squared centroid error of present classes; also the share of
    images whose every (class, colour) count is exact."""
    lcc = F.cross_entropy(out["color_class_counts"].flatten(0, 2), targets["color_class_counts"].flatten())
    lc = F.cross_entropy(out["class_counts"].flatten(0, 1), targets["class_counts"].flatten())
    pres = targets["present"]
    lp = ((out["centroids"] - targets["centroids"]).square().sum(-1) * pres).sum() / pres.sum().clamp(min=1)
    with torch.no_grad():
        exact = (out["color_class_counts"].argmax(-1) == targets["color_class_counts"]).flatten(1).all(1).float().mean()
    return lcc + lc + lp, {"reader/exact_counts": float(exact)}


class ReaderPreferenceNet(_Calibrated):
    """r(image, prompt) = w_F * mean_k sigmoid(check_k) + w_Q * a(image), in Bradley-Terry logit units.

    A SceneReader (also trained on renders) reads the image; an MLP over [its reading, the caption's GRU code]
    gives ``checks`` logits, soft yes/no answers whose mean is a faithfulness estimate bounded in [0, 1], so
    images equally faithful differ mostly through the aesthetic model's logit a(image) (passed in as
    ``quality``). w_F and w_Q are learned positive weights, initialised at 0.6 / T and 0.4.
    """

    def __init__(self, vocab_size: int, n_classes: int, width: int = 32, embed_dim: int = 32, text_hidden: int = 64,
                 checks: int = 4, hidden: int = 256, temperature: float = 0.05, with_hidden: bool = False):
        super().__init__()
        self.reader = SceneReader(n_classes, width)
        self.text = PromptEncoder(vocab_size, embed_dim, text_hidden)
        self.with_hidden = bool(with_hidden)  # the checks also see the reader's hidden features, not only its reading
        d = self.reader.out_dim + (self.reader.hidden_dim if with_hidden else 0)
        self.checks = nn.Sequential(nn.Linear(d + self.text.out_dim, hidden), nn.SiLU(),
                                    nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, checks))
        self.log_w_faithful = nn.Parameter(torch.tensor(float(np.log(0.6 / temperature))))
        self.log_w_quality = nn.Parameter(torch.tensor(float(np.log(0.4))))
        self._init_calibration(temperature)

    def faithfulness(self, images, input_ids, attention_mask) -> torch.Tensor:
        """The mean of the check probabilities, in [0, 1] (B,)."""
        h = torch.cat([self.reader.read(images, self.with_hidden), self.text(input_ids, attention_mask)], 1)
        return torch.sigmoid(self.checks(h)).mean(1)

    def forward(self, images, input_ids, attention_mask, quality, renders: torch.Tensor | None = None):
        """The raw reward (B,); with ``renders`` also the reader's output on them (its training loss, in the same
        forward call so that distributed training sees one forward)."""
        r = (self.log_w_faithful.exp() * self.faithfulness(images, input_ids, attention_mask)
             + self.log_w_quality.exp() * quality)
        return r if renders is None else (r, self.reader(renders))


class ShapesEncoder(nn.Module):
    """Feature extractor for FD-shapes, trained to read scene content from renders."""

    def __init__(self, n_classes: int, width: int = 32, feature_dim: int = 64):
        super().__init__()
        self.n_classes = n_classes
        self.trunk = ConvTrunk(width)
        self.proj = nn.Linear(self.trunk.out_channels, feature_dim)
        self.class_counts = nn.Linear(feature_dim, n_classes * (MAX_COUNT + 1))
        self.color_counts = nn.Linear(feature_dim, len(GENEVAL_COLORS) * (MAX_COUNT + 1))
        self.occupancy = nn.Linear(feature_dim, GRID * GRID)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, feature_dim) non-negative features."""
        return F.silu(self.proj(self.trunk(images).mean((2, 3))))

    def forward(self, images):
        f = self.features(images)
        B = len(f)
        return {"class_counts": self.class_counts(f).view(B, self.n_classes, MAX_COUNT + 1),
                "color_counts": self.color_counts(f).view(B, len(GENEVAL_COLORS), MAX_COUNT + 1),
                "occupancy": self.occupancy(f)}


def encoder_targets(scenes, spec: WorldSpec) -> dict[str, torch.Tensor]:
    """Ground truth of ShapesEncoder's heads from renderer scenes (counts clamped to MAX_COUNT)."""
    B, C = len(scenes), len(spec.classes)
    cls = torch.zeros(B, C, dtype=torch.long)
    col = torch.zeros(B, len(GENEVAL_COLORS), dtype=torch.long)
    occ = torch.zeros(B, GRID * GRID)
    S = spec.image_size
    for b, scene in enumerate(scenes):
        for o in scene.objects:
            if o.cls in spec.classes:
                cls[b, spec.classes.index(o.cls)] += 1
            col[b, GENEVAL_COLORS.index(o.color)] += 1
            gx = min(max(int(o.cx / S * GRID), 0), GRID - 1)
            gy = min(max(int(o.cy / S * GRID), 0), GRID - 1)
            occ[b, gy * GRID + gx] = 1.0
    return {"class_counts": cls.clamp(max=MAX_COUNT), "color_counts": col.clamp(max=MAX_COUNT), "occupancy": occ}


def encoder_loss(out: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Cross-entropy on the count heads plus binary cross-entropy on occupancy; also count accuracies."""
    lc = F.cross_entropy(out["class_counts"].flatten(0, 1), targets["class_counts"].flatten())
    lk = F.cross_entropy(out["color_counts"].flatten(0, 1), targets["color_counts"].flatten())
    lo = F.binary_cross_entropy_with_logits(out["occupancy"], targets["occupancy"])
    with torch.no_grad():
        acc_c = (out["class_counts"].argmax(-1) == targets["class_counts"]).all(1).float().mean()
        acc_k = (out["color_counts"].argmax(-1) == targets["color_counts"]).all(1).float().mean()
    return lc + lk + lo, {"encoder/class_count_acc": float(acc_c), "encoder/color_count_acc": float(acc_k)}


# ---------------------------------------------------------------------------- options and construction


@dataclass
class Architecture:
    """What rebuilds the three networks (read from a bundle's config.yaml)."""

    vocab: list[str]
    n_classes: int
    width: int = 32  # preference CNN base width
    aesthetic_width: int = 24
    encoder_width: int = 24
    embed_dim: int = 32
    text_hidden: int = 64
    feature_dim: int = 64
    temperature: float = 0.05
    quality_temperature: float = 0.05
    max_tokens: int = 16
    preference_net: str = "film"  # film: PreferenceNet; reader: ReaderPreferenceNet (needs the aesthetic model)
    checks: int = 4  # ReaderPreferenceNet's soft checks
    check_inputs: str = "reading"  # reading | reading+hidden: what ReaderPreferenceNet's checks see
    mirror_average: bool = True  # score = mean over the image and its mirror (left / right swapped in the prompt)

    def build(self, name: str) -> nn.Module:
        if name == "preference" and self.preference_net == "reader":
            return ReaderPreferenceNet(len(self.vocab) + 4, self.n_classes, self.width, self.embed_dim, self.text_hidden,
                                       self.checks, temperature=self.temperature,
                                       with_hidden=self.check_inputs == "reading+hidden")
        if name == "preference":
            return PreferenceNet(len(self.vocab) + 4, self.width, self.embed_dim, self.text_hidden, self.temperature)
        if name == "aesthetic":
            return AestheticNet(self.aesthetic_width, self.quality_temperature)
        if name == "encoder":
            return ShapesEncoder(self.n_classes, self.encoder_width, self.feature_dim)
        raise UserError(f"unknown reward network {name!r}; use one of {list(NETWORKS)}.")

    def tokenizer(self):
        return WordTokenizer(list(self.vocab), self.max_tokens)


def architecture_from_config(method: dict, backend: dict) -> Architecture:
    """Architecture of a run config's method (reward options) and backend (world) sections."""
    spec = spec_from_config(backend)
    return Architecture(vocab=vocabulary(spec), n_classes=len(spec.classes), width=int(method["width"]),
                        aesthetic_width=int(method["aesthetic_width"]), encoder_width=int(method["encoder_width"]),
                        embed_dim=int(method["embed_dim"]), text_hidden=int(method["text_hidden"]),
                        feature_dim=int(method["feature_dim"]), temperature=float(method["temperature"]),
                        quality_temperature=float(method["quality_temperature"]),
                        max_tokens=int(backend.get("max_tokens", 16)),
                        preference_net=str(method.get("preference_net", "film")), checks=int(method.get("checks", 4)),
                        check_inputs=str(method.get("check_inputs", "reading")),
                        mirror_average=bool(method.get("mirror_average", True)))


def spec_from_config(backend: dict) -> WorldSpec:
    return WorldSpec(image_size=int(backend.get("image_size", 32)), classes=tuple(backend["classes"]),
                     size_range=tuple(backend.get("size_range", (10.0, 15.0))), max_objects=int(backend.get("max_objects", 4)))
