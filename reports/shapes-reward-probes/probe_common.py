"""Shared pieces of the reward probes: the world and pools, a scene reader with its targets and loss, pool
features, and a Bradley-Terry head trained on frozen features. Imported by the probe scripts beside it."""
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.shapes.pairs import (PIXEL_CORRUPTIONS, SCENE_CORRUPTIONS, all_pairs, bradley_terry_labels, corrupt_pixels,
                                     corrupt_scene, flip_prompt, pairwise_agreement, random_corruptions, sample_groups,
                                     sample_pairs, within_group_pairs)
from benchmarks.shapes.reward_models import PromptEncoder, reader_loss, reader_targets  # noqa: F401  (re-exported)
from benchmarks.shapes.reward_models import SceneReader as Reader  # noqa: F401  (re-exported)
from rtdmd import registry
from rtdmd.api import make_config
from rtdmd.methods.reward_model import architecture, load_or_build_pool
from rtdmd.world.shapes import render, sample_training_example, to_uint8



def v1_bundle() -> Path:
    """The first shipped reward bundle (commit f0ebb83; its aesthetic model is an input of some probes), copied out
    of the git history into the cache once."""
    out = Path("~/.cache/rtdmd-bench/shapes_rewards_v1").expanduser()
    if not (out / "bundle.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        for name in ("model.safetensors", "config.yaml", "bundle.json", "README.md"):
            blob = subprocess.run(["git", "show", f"f0ebb83:rtdmd/assets/shapes_rewards/{name}"], check=True,
                                  capture_output=True, cwd=Path(__file__).parent).stdout
            (out / name).write_bytes(blob)
    return out


V1_BUNDLE = v1_bundle()


class World:
    """The shapes backend of the reward config, its tokenizer and the cached train / held-out pools (the training
    pool of 1,200 groups the probes before the pool grew used, and the FiLM preference network they trained,
    unless ``overrides`` say otherwise)."""

    def __init__(self, overrides=None):
        overrides = {"method": {"groups": 1200, "preference_net": "film", **(overrides or {}).get("method", {})},
                     **{k: v for k, v in (overrides or {}).items() if k != "method"}}
        self.cfg = make_config("reward", backend="shapes", overrides=overrides)
        self.backend = registry.get_backend("shapes").factory(self.cfg.backend, torch.device("cpu"))
        self.spec = self.backend.spec
        self.arch = architecture(self.cfg.method, self.backend)
        self.tok = self.arch.tokenizer()
        self.vocab_size = len(self.arch.vocab) + 4
        self.train = load_or_build_pool(self.cfg.method, self.backend, "train", progress=False)
        self.held = load_or_build_pool(self.cfg.method, self.backend, "heldout", progress=False)
        self.hpairs = within_group_pairs(self.held.group)
        i, j = self.hpairs.T
        self.f_pairs = self.hpairs[np.abs(self.held.faithfulness[i] - self.held.faithfulness[j]) > 0]

    @torch.no_grad()
    def held_scores(self, fn, batch=256):
        """fn(images, prompts) -> (B,) scores, over the held-out pool in batches (numpy)."""
        x, prompts = pool_images(self.held), self.held.image_prompts()
        return torch.cat([fn(x[i:i + batch], prompts[i:i + batch]) for i in range(0, len(x), batch)]).numpy()

    def agreement(self, scores):
        """(held-out agreement with the oracle, agreement with F on the pairs whose F differs)."""
        return (pairwise_agreement(scores, self.held.oracle, self.hpairs)[0],
                pairwise_agreement(scores, self.held.faithfulness, self.f_pairs)[0])

    def pair_batch(self, n, g):
        """n within-prompt training pairs (a, b), their Bradley-Terry labels, mirror flags and captions."""
        tr = self.train
        ia, ib = sample_pairs(tr, n, g, same_group=True)
        y = bradley_terry_labels(tr.oracle[ia], tr.oracle[ib], 0.05, g)
        flip = torch.rand(n, generator=g) < 0.5
        ps = [tr.prompts[tr.group[i]] for i in ia]
        return ia, ib, y, flip, [flip_prompt(p) if f else p for p, f in zip(ps, flip.tolist())]


def corrupted_batch(n, rng, spec, pcorrupt):
    """n training scenes, each corrupted (pool corruptions) with probability pcorrupt: (scenes, images)."""
    scenes, kinds_list = [], []
    for _ in range(n):
        sc, _ = sample_training_example(rng, spec, 0.3)
        kinds = random_corruptions(rng) if rng.random() < pcorrupt else []
        for k in kinds:
            if k in SCENE_CORRUPTIONS:
                sc = corrupt_scene(sc, k, rng, spec)
        scenes.append(sc)
        kinds_list.append(kinds)
    x = render(scenes, spec).images
    out = []
    for im, kinds in zip(x, kinds_list):
        im = im.numpy().astype(np.float64)
        for k in kinds:
            if k in PIXEL_CORRUPTIONS:
                im = corrupt_pixels(im, k, rng, spec)
        out.append(torch.from_numpy(im).float())
    return scenes, torch.from_numpy(to_uint8(torch.stack(out)).astype(np.float32) / 255.0).permute(0, 3, 1, 2)


def pool_images(pool, flip=False):
    x = torch.from_numpy(pool.images).permute(0, 3, 1, 2).float() / 255
    return x.flip(-1) if flip else x


@torch.no_grad()
def pool_features(pool, fn, flip=False, batch=256):
    """fn(images) -> (B, D) features over a pool, in batches."""
    x = pool_images(pool, flip)
    return torch.cat([fn(x[i:i + batch]) for i in range(0, len(x), batch)])


def group_batch(pool, n_groups, ref, g, same_group=True):
    """Every within-prompt pair (or every pair: same_group False) of the images of n_groups random groups
    (benchmarks.shapes.pairs, as the trainer draws them): (image indices, mirror flag per image, pair positions
    i / j, Bradley-Terry labels on ref, mirrored captions)."""
    idx, slot = sample_groups(pool, n_groups, g)
    flip = (torch.rand(n_groups, generator=g) < 0.5)[torch.as_tensor(slot)]
    ii, jj = all_pairs(slot, same_group)
    y = bradley_terry_labels(ref[idx[ii]], ref[idx[jj]], 0.05, g)
    prompts = [pool.prompts[pool.group[i]] for i in idx]
    return idx, flip, ii, jj, y, [flip_prompt(p) if f else p for p, f in zip(prompts, flip.tolist())]


class Head(nn.Module):
    """MLP over [frozen image features, caption GRU]."""

    def __init__(self, d, vocab_size, hidden=256, dropout=0.0):
        super().__init__()
        self.text = PromptEncoder(vocab_size, 32, 64)
        self.net = nn.Sequential(nn.Linear(d + 128, hidden), nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden, 1))

    def forward(self, f, ids, mask):
        return self.net(torch.cat([f, self.text(ids, mask)], 1))[:, 0]


def train_head(w, train_feats, held_feats, g, steps, batch=128, hidden=256, dropout=0.0, eval_every=1000, t0=None):
    """Bradley-Terry training of a Head on frozen features (train_feats = [unflipped, mirrored]); prints agreement."""
    t0 = time.time() if t0 is None else t0
    net = Head(train_feats[0].shape[1], w.vocab_size, hidden, dropout)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    hids = w.tok(w.held.image_prompts())
    run = 0.0
    for step in range(1, steps + 1):
        net.train()
        ia, ib, y, flip, prompts = w.pair_batch(batch, g)
        fa = torch.where(flip[:, None], train_feats[1][ia], train_feats[0][ia])
        fb = torch.where(flip[:, None], train_feats[1][ib], train_feats[0][ib])
        ids, mask = w.tok(prompts)
        loss = F.binary_cross_entropy_with_logits(net(fa, ids, mask) - net(fb, ids, mask), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        run = 0.98 * run + 0.02 * loss.item()
        if step % eval_every == 0:
            net.eval()
            with torch.no_grad():
                held, f = w.agreement(net(held_feats, *hids).numpy())
            print(f"step {step} loss {run:.4f} held {held:.4f} F {f:.4f} t {time.time() - t0:.0f}s", flush=True)
    return net
