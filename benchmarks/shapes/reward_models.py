"""Reward bundles: the trained learned shapes rewards and shapes encoder, loaded, saved and scored.

A reward bundle is a folder with ``model.safetensors`` (keys prefixed ``preference.``,
``aesthetic.``, ``encoder.``), the training ``config.yaml`` and ``meta.json``; the project
ships one in rtdmd/assets/shapes_rewards. A training checkpoint of ``rtdmd-bench train
reward`` (benchmarks.shapes.reward_training) loads the same way. The networks:
benchmarks.shapes.reward_nets.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from benchmarks.shapes.pairs import flip_prompt, pairwise_agreement, within_group_pairs
from benchmarks.shapes.reward_nets import (NETWORKS, AestheticNet, Architecture, PreferenceNet, ReaderPreferenceNet,
                                           ShapesEncoder, architecture_from_config, spec_from_config)
from benchmarks.shapes.reward_training import load_or_build_pool
from rtdmd import registry
from rtdmd.checkpoint import find_checkpoint, read_meta, sha256_file
from rtdmd.config import load_resolved
from rtdmd.errors import UserError
from rtdmd.world.shapes import WorldSpec

SHIPPED = Path(__file__).resolve().parents[2] / "rtdmd" / "assets" / "shapes_rewards"

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
    f = folder / "config.yaml"
    if not f.is_file():
        raise UserError(f"{folder} has no config.yaml; pass a reward bundle folder or a 'train reward' checkpoint.")
    return yaml.safe_load(f.read_text())


def _sha256(path: Path) -> str:
    return sha256_file(path)


def load_bundle(path: str | Path | None = None, device: str | torch.device = "cpu") -> RewardBundle:
    """The shipped bundle (path None), another bundle folder, or a 'train reward' run / checkpoint; cached per process."""
    folder = Path(path).expanduser() if path is not None else SHIPPED
    key = (str(folder.resolve()), str(device))
    if key in _BUNDLES:
        return _BUNDLES[key]
    if not folder.exists():
        raise UserError(f"reward weights {folder} do not exist; pass a bundle folder or train one with "
                        "'rtdmd-bench train reward --backend shapes'.")
    if not (folder / "model.safetensors").is_file() or not (folder / "bundle.json").is_file():
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
