"""Probe: a scene reader (per class-colour counts, class counts, centroids) trained on renders (clean, or with the
pool's corruptions: --pcorrupt), frozen; then a Bradley-Terry head on its predictions + the aesthetic score."""
import argparse
import time

import numpy as np
import torch

from benchmarks.shapes.reward_models import load_bundle
from probe_common import V1_BUNDLE, Reader, World, corrupted_batch, pool_features, reader_loss, reader_targets, train_head

torch.set_num_threads(1)
ap = argparse.ArgumentParser()
ap.add_argument("--rsteps", type=int, default=3000)
ap.add_argument("--steps", type=int, default=8000)
ap.add_argument("--batch", type=int, default=128)
ap.add_argument("--hidden", type=int, default=256)
ap.add_argument("--width", type=int, default=32)
ap.add_argument("--dropout", type=float, default=0.1)
ap.add_argument("--pcorrupt", type=float, default=0.0, help="share of training renders with pool corruptions (0: clean)")
a = ap.parse_args()
w = World()
R = Reader(len(w.spec.classes), a.width)
opt = torch.optim.AdamW(R.parameters(), lr=1e-3, weight_decay=1e-4)
g, rng, t0 = torch.Generator().manual_seed(0), np.random.default_rng(123), time.time()
for step in range(1, a.rsteps + 1):
    if a.pcorrupt > 0:
        scenes, images = corrupted_batch(64, rng, w.spec, a.pcorrupt)
    else:
        d = w.backend.sample_data(64, g)
        scenes, images = d.scenes, d.images
    loss, acc = reader_loss(R(images), reader_targets(scenes, w.spec))
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 500 == 0:
        print(f"reader {step} loss {loss.item():.4f} cc_acc {acc['reader/exact_counts']:.3f} t {time.time() - t0:.0f}s", flush=True)
R.eval()
bd = load_bundle(V1_BUNDLE)


def feats(x):
    return torch.cat([R.read(x), bd.aesthetic(x)[:, None] * 0.05], 1)


TF = [pool_features(w.train, feats), pool_features(w.train, feats, flip=True)]
HF = pool_features(w.held, feats)
print("features", TF[0].shape, f"{time.time() - t0:.0f}s", flush=True)
train_head(w, TF, HF, g, a.steps, a.batch, a.hidden, a.dropout, eval_every=1000, t0=t0)
