"""Learned shapes rewards and the shapes encoder: small differentiable torch networks.

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

A reward bundle is a folder with ``model.safetensors`` (keys prefixed ``preference.``,
``aesthetic.``, ``encoder.``), the training ``config.yaml`` and ``meta.json``; the project
ships one in rtdmd/assets/shapes_rewards. A training checkpoint of ``rtdmd-bench train
reward`` loads the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rtdmd.errors import UserError
from rtdmd.world.shapes import GENEVAL_COLORS, WorldSpec, vocabulary

SHIPPED = Path(__file__).resolve().parents[2] / "rtdmd" / "assets" / "shapes_rewards"
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
        from rtdmd.backends.shapes import WordTokenizer

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


# ---------------------------------------------------------------------------- bundles


@dataclass
class RewardBundle:
    preference: PreferenceNet
    aesthetic: AestheticNet
    encoder: ShapesEncoder
    architecture: Architecture
    spec: WorldSpec
    identity: str  # path@sha256:<12 hex> of the weights
    meta: dict

    def tokenize(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.architecture.tokenizer()(list(prompts))
        return ids.to(device), mask.to(device)


_BUNDLES: dict[tuple[str, str], RewardBundle] = {}


def _read_config(folder: Path) -> dict:
    import yaml

    f = folder / "config.yaml"
    if not f.is_file():
        raise UserError(f"{folder} has no config.yaml; pass a reward bundle folder or a 'train reward' checkpoint.")
    return yaml.safe_load(f.read_text())


def _sha256(path: Path) -> str:
    from rtdmd.checkpoint import sha256_file

    return sha256_file(path)


def load_bundle(path: str | Path | None = None, device: str | torch.device = "cpu") -> RewardBundle:
    """The shipped bundle (path None), another bundle folder, or a 'train reward' run / checkpoint; cached per process."""
    from safetensors.torch import load_file

    folder = Path(path).expanduser() if path is not None else SHIPPED
    key = (str(folder.resolve()), str(device))
    if key in _BUNDLES:
        return _BUNDLES[key]
    if not folder.exists():
        raise UserError(f"reward weights {folder} do not exist; pass a bundle folder or train one with "
                        "'rtdmd-bench train reward --backend shapes'.")
    if not (folder / "model.safetensors").is_file() or not (folder / "bundle.json").is_file():
        from rtdmd.checkpoint import find_checkpoint

        folder = find_checkpoint(folder)  # a run or step directory of 'train reward'
    cfg = _read_config(folder)
    if cfg.get("method", {}).get("name") != "reward":
        raise UserError(f"{folder} was not trained by 'rtdmd-bench train reward'; pass a shapes reward bundle.")
    arch = architecture_from_config(cfg["method"], cfg["backend"])
    if (folder / "bundle.json").is_file():
        weights = folder / "model.safetensors"
        flat = load_file(str(weights))
        meta = json.loads((folder / "bundle.json").read_text())
        if meta.get("sha256") and meta["sha256"] != _sha256(weights):
            raise UserError(f"{weights} does not match the sha256 in bundle.json (corrupt or modified); restore it or retrain.")
        states = {n: {k[len(n) + 1:]: v for k, v in flat.items() if k.startswith(n + ".")} for n in NETWORKS}
    else:
        files = _checkpoint_files(folder)
        weights = files["preference"]
        states = {n: load_file(str(f)) for n, f in files.items()}
        meta = {"checkpoint": str(folder), "weights": {n: f.name for n, f in files.items()}}
    nets = {}
    for n in NETWORKS:
        net = arch.build(n)
        try:
            net.load_state_dict(states[n])
        except RuntimeError as exc:
            raise UserError(f"the {n} weights in {folder} do not fit the architecture of its config.yaml "
                            f"({str(exc).splitlines()[0][:100]}); use an unmodified bundle.") from None
        nets[n] = net.to(device).eval().requires_grad_(False)
    bundle = RewardBundle(nets["preference"], nets["aesthetic"], nets["encoder"], arch, spec_from_config(cfg["backend"]),
                          f"{folder.resolve()}@sha256:{_sha256(weights)[:12]}", meta)
    _BUNDLES[key] = bundle
    return bundle


def _checkpoint_files(step_dir: Path) -> dict[str, Path]:
    """Each network's weights in a training checkpoint: its EMA copy when the run kept one."""
    out = {}
    for n in NETWORKS:
        ema, net = step_dir / "state" / f"ema_{n}.safetensors", step_dir / "state" / f"net_{n}.safetensors"
        if not (ema.is_file() or net.is_file()):
            raise UserError(f"{step_dir} holds no state for reward network {n}; pass a full 'train reward' checkpoint or a bundle.")
        out[n] = ema if ema.is_file() else net
    return out


@torch.no_grad()
def recalibrate(bundle: RewardBundle, pool, batch_size: int = 256) -> dict[str, float]:
    """Set each reward's offset to mean(reference - scale * raw) over a pool (oracle for preference, Q for aesthetic).

    The running offset of training was measured on the live weights; bundles hold EMA weights.
    """
    images = torch.from_numpy(pool.images).permute(0, 3, 1, 2).float() / 255.0
    prompts = pool.image_prompts()
    out = {}
    for kind, net, ref in (("shapes_pref", bundle.preference, pool.oracle), ("shapes_aes", bundle.aesthetic, pool.quality)):
        reward = LearnedReward(kind, bundle, batch_size=batch_size)
        raw = torch.cat([reward._raw(images[i:i + batch_size], prompts[i:i + batch_size])
                         for i in range(0, len(images), batch_size)])
        net.offset.fill_(float((torch.as_tensor(ref, dtype=torch.float32) - net.scale * raw).mean()))
        out[kind] = float(net.offset)
    return out


def save_bundle(bundle: RewardBundle, config_yaml: str, out: str | Path, extra_meta: dict | None = None) -> Path:
    """Write a bundle folder: model.safetensors (prefixed keys), config.yaml, bundle.json with the sha256."""
    from safetensors.torch import save_file

    flat = {}
    for n in NETWORKS:
        flat.update({f"{n}.{k}": v.detach().contiguous().cpu() for k, v in getattr(bundle, n).state_dict().items()})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(flat, str(out / "model.safetensors"))
    (out / "config.yaml").write_text(config_yaml)
    meta = {"sha256": _sha256(out / "model.safetensors"),
            "parameters": {n: int(sum(p.numel() for p in getattr(bundle, n).parameters())) for n in NETWORKS},
            **(extra_meta or {})}
    (out / "bundle.json").write_text(json.dumps(meta, indent=2) + "\n")
    _BUNDLES.pop((str(out.resolve()), "cpu"), None)
    return out


def export_bundle(checkpoint: str | Path, out: str | Path, extra_meta: dict | None = None, pool=None) -> Path:
    """A 'train reward' checkpoint (EMA weights where kept) -> bundle folder; offsets recalibrated on ``pool`` if given."""
    from rtdmd.checkpoint import find_checkpoint, read_meta

    step_dir = find_checkpoint(checkpoint)
    bundle = load_bundle(step_dir)
    _BUNDLES.clear()  # recalibration below changes the cached networks
    meta = {k: read_meta(step_dir).get(k) for k in ("step", "git_commit", "train_seconds")}
    meta["weights"] = bundle.meta.get("weights")
    if pool is not None:
        meta["offsets"] = recalibrate(bundle, pool)
    return save_bundle(bundle, (step_dir / "config.yaml").read_text(), out, {**meta, **(extra_meta or {})})


# ---------------------------------------------------------------------------- Reward protocol


class LearnedReward:
    """shapes_pref / shapes_aes behind the Reward protocol; scores in oracle units."""

    def __init__(self, kind: str, bundle: RewardBundle, differentiable: bool = False, batch_size: int = 256):
        if kind not in ("shapes_pref", "shapes_aes"):
            raise UserError(f"unknown learned shapes reward {kind!r}; use shapes_pref or shapes_aes.")
        self.name = kind
        self.bundle = bundle
        self.net = bundle.preference if kind == "shapes_pref" else bundle.aesthetic
        self.differentiable = bool(differentiable)
        self.batch_size = int(batch_size)
        self.identity = f"{kind}[{bundle.identity}]"
        self.device = next(self.net.parameters()).device

    def _raw(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x = images.to(self.device, torch.float32)
        if not self.bundle.architecture.mirror_average:
            return self._raw_view(x, prompts)
        # the world and the oracle are mirror-symmetric (docs/shapes-rewards.md): averaging the two views makes the
        # learned rewards exactly so as well
        from benchmarks.shapes.pairs import flip_prompt

        return 0.5 * (self._raw_view(x, prompts) + self._raw_view(x.flip(-1), [flip_prompt(p) for p in prompts]))

    def _raw_view(self, x: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if self.name == "shapes_pref":
            ids, mask = self.bundle.tokenize(prompts, self.device)
            if isinstance(self.net, ReaderPreferenceNet):
                return self.net(x, ids, mask, self.bundle.aesthetic(x))
            return self.net(x, ids, mask)
        return self.net(x)

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.net.scale * self._raw(images, prompts) + self.net.offset

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise UserError(f"{self.name} takes (B, 3, H, W) images in [0, 1], got shape {tuple(images.shape)}.")
        if len(prompts) != len(images):
            raise UserError(f"{self.name} got {len(images)} images but {len(prompts)} prompts; pass one prompt per image.")
        outs = []
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            for i in range(0, len(images), self.batch_size):
                outs.append(self._score(images[i:i + self.batch_size], list(prompts[i:i + self.batch_size])))
        out = torch.cat(outs) if outs else torch.zeros(0, device=self.device)
        return out.to(images.device)


# ---------------------------------------------------------------------------- held-out evaluation


@torch.no_grad()
def evaluate_bundle(bundle: RewardBundle, pool, batch_size: int = 256) -> dict:
    """Pairwise agreement of the learned rewards with the oracle on a (held-out) pool.

    preference: within-prompt pairs against the oracle; aesthetic: the same pairs against
    the oracle's quality part Q; both counted on pairs whose reference differs at all, and
    on pairs whose reference differs by more than 0.05.
    """
    from benchmarks.shapes.pairs import pairwise_agreement, within_group_pairs

    images = torch.from_numpy(pool.images).permute(0, 3, 1, 2).float() / 255.0
    prompts = pool.image_prompts()
    pref = LearnedReward("shapes_pref", bundle, batch_size=batch_size)(images, prompts).numpy()
    aes = LearnedReward("shapes_aes", bundle, batch_size=batch_size)(images, prompts).numpy()
    pairs = within_group_pairs(pool.group)
    out = {"images": len(pool), "pairs": int(len(pairs))}
    for name, s, ref in (("preference", pref, pool.oracle), ("aesthetic", aes, pool.quality)):
        a0, n0 = pairwise_agreement(s, ref, pairs, 0.0)
        a5, n5 = pairwise_agreement(s, ref, pairs, 0.05)
        out[name] = {"agreement": a0, "pairs": n0, "agreement_gap_0.05": a5, "pairs_gap_0.05": n5,
                     "mae_vs_reference": float(np.abs(s - ref).mean()),
                     "pearson": float(np.corrcoef(s, ref)[0, 1])}
    return out


# ---------------------------------------------------------------------------- export command


def export_and_evaluate(run: str | Path, out: str | Path, progress: bool = True) -> dict:
    """Export a 'train reward' run (offsets recalibrated on its training pool) and measure agreement with the
    oracle on the training pool and on the held-out pool (built and cached like the training pool).

    The agreement numbers go into the bundle's bundle.json.
    """
    from rtdmd import registry
    from rtdmd.checkpoint import find_checkpoint
    from rtdmd.config import load_resolved
    from rtdmd.methods.reward_model import load_or_build_pool

    step_dir = find_checkpoint(run)
    cfg = load_resolved(step_dir / "config.yaml")
    if cfg.method_name != "reward":
        raise UserError(f"{step_dir} is a '{cfg.method_name}' checkpoint; pass a 'train reward' run.")
    backend = registry.get_backend(cfg.backend_name).factory(cfg.backend, "cpu")
    train = load_or_build_pool(cfg.method, backend, "train", progress=progress)
    heldout = load_or_build_pool(cfg.method, backend, "heldout", progress=progress)
    path = export_bundle(step_dir, out, pool=train)
    bundle = load_bundle(path)
    metrics = {"train": evaluate_bundle(bundle, train), "heldout": evaluate_bundle(bundle, heldout)}
    meta = json.loads((path / "bundle.json").read_text())
    (path / "bundle.json").write_text(json.dumps({**meta, **metrics}, indent=2) + "\n")  # the sha256 covers the weights only
    return {"bundle": str(path), **metrics}


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.shapes.reward_models",
                                description="Evaluate a 'rtdmd-bench train reward' run on held-out pairs and export its bundle.")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="held-out agreement with the oracle, then write the bundle folder")
    e.add_argument("--run", required=True, help="run or checkpoint directory of 'rtdmd-bench train reward'")
    e.add_argument("--out", required=True, help="bundle folder to write (e.g. rtdmd/assets/shapes_rewards)")
    args = p.parse_args(argv)
    try:
        print(json.dumps(export_and_evaluate(args.run, args.out), indent=2))
    except UserError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
