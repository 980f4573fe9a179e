"""Learning-curve probe for the shapes rewards: one network (preference or aesthetic) of the shipped architecture
trained on Bradley-Terry pairs, held-out agreement of its EMA and live weights logged."""
import argparse
import time

import torch
import torch.nn.functional as F

from benchmarks.shapes.pairs import bradley_terry_labels, flip_prompt, pairwise_agreement, sample_pairs
from probe_common import V1_BUNDLE, World, pool_images

torch.set_num_threads(1)
ap = argparse.ArgumentParser()
ap.add_argument("--net", default="preference", choices=["preference", "aesthetic"])
ap.add_argument("--steps", type=int, default=4000)
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--wd", type=float, default=1e-4)
ap.add_argument("--width", type=int, default=32)
ap.add_argument("--temp", type=float, default=0.05)
ap.add_argument("--eval-every", type=int, default=500)
ap.add_argument("--init-encoder", action="store_true", help="start the trunk from the shipped encoder's (width 24)")
a = ap.parse_args()
w = World({"method": {"width": a.width, "aesthetic_width": a.width}})
pref = a.net == "preference"
net = w.arch.build(a.net)
if a.init_encoder:
    from benchmarks.shapes.reward_models import load_bundle

    missing = net.trunk.load_state_dict(load_bundle(V1_BUNDLE).encoder.trunk.state_dict(), strict=False)
    print("init from encoder trunk; missing", missing.missing_keys, flush=True)
train, held = w.train, w.held
X = pool_images(train)
ref, href = (train.oracle, held.oracle) if pref else (train.quality, held.quality)
opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=a.wd)
ema = torch.optim.swa_utils.AveragedModel(net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.999))
g = torch.Generator().manual_seed(0)


def score(m, x, prompts):
    return m(x, *w.tok(prompts)) if pref else m(x)


def held_agreement(m):
    return pairwise_agreement(w.held_scores(lambda x, p: score(m, x, p)), href, w.hpairs)[0]


t0, run = time.time(), 0.0
for step in range(1, a.steps + 1):
    ia, ib = sample_pairs(train, a.batch, g, same_group=pref)
    y = bradley_terry_labels(ref[ia], ref[ib], a.temp, g)
    flip = torch.rand(a.batch, generator=g) < 0.5
    f2 = flip.repeat(2)
    imgs = X[torch.as_tensor(list(ia) + list(ib))]
    imgs = torch.where(f2.view(-1, 1, 1, 1), imgs.flip(-1), imgs)
    prompts = [train.prompts[train.group[i]] for i in list(ia) + list(ib)]
    prompts = [flip_prompt(p) if f else p for p, f in zip(prompts, f2.tolist())]
    raw = score(net, imgs, prompts)
    loss = F.binary_cross_entropy_with_logits(raw[:a.batch] - raw[a.batch:], y)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    ema.update_parameters(net)
    run = 0.98 * run + 0.02 * loss.item()
    if step % a.eval_every == 0 or step == a.steps:
        print(f"step {step} loss {run:.4f} held_ema {held_agreement(ema.module):.4f} held_raw {held_agreement(net):.4f} "
              f"t {time.time() - t0:.0f}s", flush=True)
