"""Probe: the scene reader trained jointly on renders (scene labels) and Bradley-Terry pairs through an MLP head
over [reader predictions, the shipped aesthetic score, caption GRU]; held-out agreement logged."""
import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.shapes.reward_models import load_bundle
from probe_common import Head, Reader, World, pool_images, reader_loss, reader_targets

torch.set_num_threads(1)
ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=5000)
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--rbatch", type=int, default=32)
ap.add_argument("--width", type=int, default=32)
ap.add_argument("--eval-every", type=int, default=500)
a = ap.parse_args()
w, bd = World(), load_bundle()


class Pref(nn.Module):
    def __init__(self):
        super().__init__()
        self.reader = Reader(len(w.spec.classes), a.width)
        self.head = Head(self.reader.out_dim + 1, w.vocab_size)

    def forward(self, x, ids, mask):
        with torch.no_grad():
            q = bd.aesthetic(x)[:, None] * 0.05
        return self.head(torch.cat([self.reader.read(x), q], 1), ids, mask)


net = Pref()
opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
ema = torch.optim.swa_utils.AveragedModel(net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.999))
X, HX, hids = pool_images(w.train), pool_images(w.held), w.tok(w.held.image_prompts())
g, t0, run = torch.Generator().manual_seed(0), time.time(), 0.0
for step in range(1, a.steps + 1):
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
    ema.update_parameters(net)
    run = 0.98 * run + 0.02 * loss.item()
    if step % a.eval_every == 0:
        res = []
        for m in (ema.module, net):
            m.eval()
            with torch.no_grad():
                s = torch.cat([m(HX[i:i + 256], hids[0][i:i + 256], hids[1][i:i + 256]) for i in range(0, len(HX), 256)])
            m.train()
            res += w.agreement(s.numpy())
        print(f"step {step} bt {run:.4f} aux {aux.item():.4f} held_ema {res[0]:.4f} F_ema {res[1]:.4f} "
              f"held_raw {res[2]:.4f} F_raw {res[3]:.4f} t {time.time() - t0:.0f}s", flush=True)
