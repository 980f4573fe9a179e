"""Probe: a Bradley-Terry head on the shipped encoder's frozen predictions (+ the aesthetic score)."""
import argparse
import time

import torch

from benchmarks.shapes.reward_models import load_bundle
from probe_common import V1_BUNDLE, World, pool_features, train_head

torch.set_num_threads(1)
ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=20000)
ap.add_argument("--batch", type=int, default=128)
ap.add_argument("--noaes", action="store_true")
ap.add_argument("--hidden", type=int, default=256)
a = ap.parse_args()
w, bd = World(), load_bundle(V1_BUNDLE)


def feats(x):
    o = bd.encoder(x)
    f = [o["class_counts"].softmax(-1).flatten(1), o["color_counts"].softmax(-1).flatten(1), o["occupancy"].sigmoid(),
         bd.encoder.features(x)]
    return torch.cat(f + ([] if a.noaes else [bd.aesthetic(x)[:, None] * 0.05]), 1)


t0 = time.time()
TF = [pool_features(w.train, feats), pool_features(w.train, feats, flip=True)]
HF = pool_features(w.held, feats)
print("features", TF[0].shape, f"{time.time() - t0:.0f}s", flush=True)
train_head(w, TF, HF, torch.Generator().manual_seed(0), a.steps, a.batch, a.hidden, eval_every=2000, t0=t0)
