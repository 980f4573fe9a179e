"""Probe: the shipped reward architectures trained on every pair of each batch instead of independent pairs.
Preference: G prompt groups per step (8 images each), all within-group pairs (28 per group) labelled by one noisy
Bradley-Terry rater each; aesthetic: all pairs among the step's images. Cosine learning-rate decay; EMA and live
held-out agreement logged."""
import argparse
import math
import time

import torch
import torch.nn.functional as F

from benchmarks.shapes.pairs import pairwise_agreement
from probe_common import V1_BUNDLE, World, group_batch, pool_images

torch.set_num_threads(1)
ap = argparse.ArgumentParser()
ap.add_argument("--net", default="preference", choices=["preference", "aesthetic"])
ap.add_argument("--steps", type=int, default=4000)
ap.add_argument("--groups", type=int, default=8, help="prompt groups per step (preference) / images = 8 x groups (aesthetic)")
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--width", type=int, default=32)
ap.add_argument("--eval-every", type=int, default=500)
ap.add_argument("--checks", type=int, default=0, help="> 0: structured preference, mean of that many sigmoid checks "
                "plus the shipped aesthetic model's logit, each with a learned positive weight")
ap.add_argument("--pool-groups", type=int, default=1200, help="training pool size (a bigger pool must be built first)")
a = ap.parse_args()
w = World({"method": {"width": a.width, "aesthetic_width": a.width, "groups": a.pool_groups}})
pref = a.net == "preference"
net = w.arch.build(a.net)
if a.checks:
    from benchmarks.shapes.reward_models import load_bundle

    class Structured(torch.nn.Module):
        def __init__(self, base, aes):
            super().__init__()
            self.base, self.aes = base, aes.requires_grad_(False)
            c = 2 * base.trunk.out_channels
            base.head = torch.nn.Sequential(torch.nn.Linear(c, c // 2), torch.nn.SiLU(), torch.nn.Linear(c // 2, a.checks))
            self.log_wf = torch.nn.Parameter(torch.tensor(math.log(0.6 / 0.05)))
            self.log_wq = torch.nn.Parameter(torch.tensor(math.log(0.4)))

        def forward(self, x, ids, mask):
            f = torch.sigmoid(self._checks(x, ids, mask)).mean(1)
            with torch.no_grad():
                q = self.aes(x)
            return self.log_wf.exp() * f + self.log_wq.exp() * q

        def _checks(self, x, ids, mask):
            from benchmarks.shapes.reward_models import _pool

            b = self.base
            cond = b.cond(b.text(ids, mask))
            return b.head(_pool(b.trunk(x, cond)))

    net = Structured(net, load_bundle(V1_BUNDLE).aesthetic)
train, held = w.train, w.held
X = pool_images(train)
ref, href = (train.oracle, held.oracle) if pref else (train.quality, held.quality)
opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=1e-4)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / a.steps, 1.0))))
ema = torch.optim.swa_utils.AveragedModel(net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.999))
g = torch.Generator().manual_seed(0)


def score(m, x, prompts):
    return m(x, *w.tok(prompts)) if pref else m(x)


def held_agreement(m):
    return pairwise_agreement(w.held_scores(lambda x, p: score(m, x, p)), href, w.hpairs)[0]


t0, run = time.time(), 0.0
for step in range(1, a.steps + 1):
    idx, flip, ii, jj, y, prompts = group_batch(train, a.groups, ref, g, same_group=pref)
    imgs = X[torch.as_tensor(idx)]
    imgs = torch.where(flip.view(-1, 1, 1, 1), imgs.flip(-1), imgs)
    raw = score(net, imgs, prompts)
    loss = F.binary_cross_entropy_with_logits(raw[ii] - raw[jj], y)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    sched.step()
    ema.update_parameters(net)
    run = 0.98 * run + 0.02 * loss.item()
    if step % a.eval_every == 0 or step == a.steps:
        print(f"step {step} loss {run:.4f} held_ema {held_agreement(ema.module):.4f} held_raw {held_agreement(net):.4f} "
              f"t {time.time() - t0:.0f}s", flush=True)
