"""Probe: the scene reader trained jointly on renders (scene labels) and Bradley-Terry pairs through an MLP head
over [reader predictions, the first bundle's aesthetic score, caption GRU] (--checks: soft checks); held-out agreement logged."""
import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.shapes.reward_models import load_bundle
from probe_common import V1_BUNDLE, Head, Reader, World, group_batch, pool_images, reader_loss, reader_targets

torch.set_num_threads(1)
ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=5000)
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--rbatch", type=int, default=32)
ap.add_argument("--width", type=int, default=32)
ap.add_argument("--eval-every", type=int, default=500)
ap.add_argument("--groups", type=int, default=0, help="> 0: that many prompt groups per step, all within-group pairs (as groupbt.py)")
ap.add_argument("--cosine", action="store_true")
ap.add_argument("--checks", type=int, default=0, help="> 0: structured head, learned weight x mean of that many sigmoid checks "
                "over [reader predictions, caption] plus learned weight x the aesthetic logit")
ap.add_argument("--pool-groups", type=int, default=4800, help="training pool size (1,200 before this pool grew)")
a = ap.parse_args()
w, bd = World({"method": {"groups": a.pool_groups}}), load_bundle(V1_BUNDLE)


class Pref(nn.Module):
    def __init__(self):
        super().__init__()
        self.reader = Reader(len(w.spec.classes), a.width)
        self.head = Head(self.reader.out_dim + (0 if a.checks else 1), w.vocab_size)
        if a.checks:
            self.head.net[-1] = nn.Linear(self.head.net[-1].in_features, a.checks)
            self.log_wf = nn.Parameter(torch.tensor(math.log(0.6 / 0.05)))
            self.log_wq = nn.Parameter(torch.tensor(math.log(0.4)))

    def forward(self, x, ids, mask):
        with torch.no_grad():
            q = bd.aesthetic(x)
        if a.checks:
            f = torch.sigmoid(self.head.net(torch.cat([self.reader.read(x), self.head.text(ids, mask)], 1))).mean(1)
            return self.log_wf.exp() * f + self.log_wq.exp() * q
        return self.head(torch.cat([self.reader.read(x), q[:, None] * 0.05], 1), ids, mask)


net = Pref()
opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
ema = torch.optim.swa_utils.AveragedModel(net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.999))
X = pool_images(w.train)
g, t0, run = torch.Generator().manual_seed(0), time.time(), 0.0
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / a.steps, 1.0))) if a.cosine else 1.0)
for step in range(1, a.steps + 1):
    if a.groups:
        idx, flip, ii, jj, y, prompts = group_batch(w.train, a.groups, w.train.oracle, g)
        imgs = X[torch.as_tensor(idx)]
        imgs = torch.where(flip.view(-1, 1, 1, 1), imgs.flip(-1), imgs)
        raw = net(imgs, *w.tok(prompts))
        loss = F.binary_cross_entropy_with_logits(raw[ii] - raw[jj], y)
    else:
        ia, ib, y, flip, prompts = w.pair_batch(a.batch, g)
        imgs = X[torch.as_tensor(list(ia) + list(ib))]
        imgs = torch.where(flip.repeat(2).view(-1, 1, 1, 1), imgs.flip(-1), imgs)
        raw = net(imgs, *w.tok(prompts * 2))
        loss = F.binary_cross_entropy_with_logits(raw[:a.batch] - raw[a.batch:], y)
    d = w.backend.sample_data(a.rbatch, g)
    aux, _ = reader_loss(net.reader(d.images), reader_targets(d.scenes, w.spec))
    opt.zero_grad()
    (loss + aux).backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    sched.step()
    ema.update_parameters(net)
    run = 0.98 * run + 0.02 * loss.item()
    if step % a.eval_every == 0:
        res = []
        for m in (ema.module, net):
            m.eval()
            s = w.held_scores(lambda x, p: m(x, *w.tok(p)))
            m.train()
            res += w.agreement(s)
        print(f"step {step} bt {run:.4f} aux {aux.item():.4f} held_ema {res[0]:.4f} F_ema {res[1]:.4f} "
              f"held_raw {res[2]:.4f} F_raw {res[3]:.4f} t {time.time() - t0:.0f}s", flush=True)
