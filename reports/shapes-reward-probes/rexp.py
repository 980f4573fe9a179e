"""Learning-curve probe for the shapes rewards: one network trained on Bradley-Terry pairs, held-out agreement logged."""
import argparse, time
import torch, torch.nn.functional as F
torch.set_num_threads(1)
from rtdmd.api import make_config
from rtdmd import registry
from rtdmd.methods.reward_model import architecture, load_or_build_pool
from benchmarks.shapes.pairs import bradley_terry_labels, flip_prompt, sample_pairs, pairwise_agreement, within_group_pairs

ap = argparse.ArgumentParser()
ap.add_argument("--net", default="preference"); ap.add_argument("--steps", type=int, default=4000)
ap.add_argument("--batch", type=int, default=32); ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--width", type=int, default=32); ap.add_argument("--cosine", action="store_true")
ap.add_argument("--eval-every", type=int, default=500); ap.add_argument("--wd", type=float, default=1e-4)
ap.add_argument("--temp", type=float, default=0.05)
ap.add_argument("--init-encoder", action="store_true")
ap.add_argument("--additive", type=int, default=0, help="width of an unconditioned quality branch added to the score (0: none)")
a = ap.parse_args()
cfg = make_config("reward", backend="shapes", overrides={"method": {"width": a.width, "aesthetic_width": a.width}, "train": {"num_threads": 1}})
backend = registry.get_backend(cfg.backend_name).factory(cfg.backend, torch.device("cpu"))
o = cfg.method
arch = architecture(o, backend); tok = arch.tokenizer()
net = arch.build(a.net); pref = a.net == "preference"
if a.init_encoder:
    from benchmarks.shapes.reward_models import load_bundle
    enc = load_bundle().encoder
    missing = net.trunk.load_state_dict(enc.trunk.state_dict(), strict=False)
    print("init from encoder trunk; missing", missing.missing_keys, flush=True)
if a.additive and pref:
    from benchmarks.shapes.reward_models import AestheticNet
    class Additive(torch.nn.Module):
        def __init__(self, cond, qual):
            super().__init__(); self.cond, self.qual = cond, qual
        def forward(self, images, ids, mask):
            return self.cond(images, ids, mask) + self.qual(images)
    net = Additive(net, AestheticNet(a.additive))
train = load_or_build_pool(o, backend, "train", progress=False); held = load_or_build_pool(o, backend, "heldout", progress=False)
print("params", sum(p.numel() for p in net.parameters()), "train", len(train), "held", len(held), flush=True)
X = torch.from_numpy(train.images).permute(0, 3, 1, 2).contiguous()
HX = torch.from_numpy(held.images).permute(0, 3, 1, 2).float() / 255
hp = held.image_prompts(); hpairs = within_group_pairs(held.group)
opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=a.wd)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, a.steps) if a.cosine else None
ema = torch.optim.swa_utils.AveragedModel(net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.999))
g = torch.Generator().manual_seed(0)
ref = train.oracle if pref else train.quality
href = held.oracle if pref else held.quality

def scores(m, imgs, prompts):
    out = []
    with torch.no_grad():
        for i in range(0, len(imgs), 256):
            x = imgs[i:i+256]
            if pref:
                ids, mask = tok(prompts[i:i+256]); out.append(m(x, ids, mask))
            else:
                out.append(m(x))
    return torch.cat(out).numpy()

t0 = time.time(); run = 0
for step in range(1, a.steps + 1):
    n = a.batch
    ia, ib = sample_pairs(train, n, g, same_group=pref)
    y = bradley_terry_labels(ref[ia], ref[ib], a.temp, g)
    flip = torch.rand(n, generator=g) < 0.5
    def batch(idx):
        x = X[torch.as_tensor(idx)].float() / 255
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    imgs = torch.cat([batch(ia), batch(ib)])
    if pref:
        ps = [train.prompts[train.group[i]] for i in list(ia) + list(ib)]
        fl = flip.tolist() * 2
        ps = [flip_prompt(p) if f else p for p, f in zip(ps, fl)]
        ids, mask = tok(ps); raw = net(imgs, ids, mask)
    else:
        raw = net(imgs)
    d = raw[:n] - raw[n:]
    loss = F.binary_cross_entropy_with_logits(d, y)
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0); opt.step(); ema.update_parameters(net)
    if sched: sched.step()
    run = 0.98 * run + 0.02 * float(loss)
    if step % a.eval_every == 0 or step == a.steps:
        s = scores(ema.module, HX, hp); s2 = scores(net, HX, hp)
        ag, _ = pairwise_agreement(s, href, hpairs); ag2, _ = pairwise_agreement(s2, href, hpairs)
        print(f"step {step} loss {run:.4f} held_ema {ag:.4f} held_raw {ag2:.4f} t {time.time()-t0:.0f}s", flush=True)
