"""Probe: SceneReader trained jointly on renders (scene labels) and Bradley-Terry pairs through an MLP head
over [reader predictions, caption GRU, the shipped aesthetic score]; held-out agreement logged."""
import argparse, time
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
torch.set_num_threads(1)
from rtdmd.api import make_config
from rtdmd import registry
from rtdmd.methods.reward_model import architecture, load_or_build_pool
from rtdmd.world.shapes import GENEVAL_COLORS
from benchmarks.shapes.pairs import bradley_terry_labels, flip_prompt, sample_pairs, pairwise_agreement, within_group_pairs
from benchmarks.shapes.reward_models import load_bundle, PromptEncoder, ConvTrunk, MAX_COUNT
ap = argparse.ArgumentParser(); ap.add_argument("--steps", type=int, default=5000); ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--rbatch", type=int, default=32); ap.add_argument("--width", type=int, default=32); ap.add_argument("--eval-every", type=int, default=500)
a = ap.parse_args()
cfg = make_config("reward", backend="shapes")
b = registry.get_backend("shapes").factory(cfg.backend, torch.device("cpu"))
spec = b.spec; C = len(spec.classes); K = len(GENEVAL_COLORS); M = MAX_COUNT + 1
class Reader(nn.Module):
    def __init__(s, w):
        super().__init__(); s.trunk = ConvTrunk(w); c = s.trunk.out_channels
        s.proj = nn.Linear(2 * c, 128); s.cc = nn.Linear(128, C * K * M); s.cls = nn.Linear(128, C * M); s.pos = nn.Linear(128, C * 2)
    def forward(s, x):
        h = s.trunk(x); f = F.silu(s.proj(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1))); B = len(x)
        return s.cc(f).view(B, C, K, M), s.cls(f).view(B, C, M), torch.tanh(s.pos(f)).view(B, C, 2)
    def read(s, x):
        occ, ocl, opos = s(x)
        return torch.cat([occ.softmax(-1).flatten(1), ocl.softmax(-1).flatten(1), opos.flatten(1)], 1)
def targets(scenes):
    B = len(scenes); cc = torch.zeros(B, C, K, dtype=torch.long); pos = torch.zeros(B, C, 2); n = torch.zeros(B, C)
    S = spec.image_size
    for i, sc in enumerate(scenes):
        for o in sc.objects:
            if o.cls in spec.classes:
                c = spec.classes.index(o.cls); cc[i, c, GENEVAL_COLORS.index(o.color)] += 1
                pos[i, c, 0] += o.cx / S * 2 - 1; pos[i, c, 1] += o.cy / S * 2 - 1; n[i, c] += 1
    pos = pos / n.clamp(min=1)[..., None]
    return cc.clamp(max=MAX_COUNT), cc.sum(2).clamp(max=MAX_COUNT), pos, (n > 0).float()
arch = architecture(cfg.method, b); tok = arch.tokenizer(); bd = load_bundle()
class Pref(nn.Module):
    def __init__(s):
        super().__init__(); s.reader = Reader(a.width); s.text = PromptEncoder(len(arch.vocab) + 4, 32, 64)
        s.head = nn.Sequential(nn.Linear(C * (K * M + M + 2) + 1 + 128, 256), nn.SiLU(), nn.Linear(256, 256), nn.SiLU(), nn.Linear(256, 1))
    def forward(s, x, ids, mask):
        with torch.no_grad(): q = bd.aesthetic(x)[:, None] * 0.05
        return s.head(torch.cat([s.reader.read(x), q, s.text(ids, mask)], 1))[:, 0]
net = Pref(); opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
ema = torch.optim.swa_utils.AveragedModel(net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.999))
tr = load_or_build_pool(cfg.method, b, "train", progress=False); he = load_or_build_pool(cfg.method, b, "heldout", progress=False)
X = torch.from_numpy(tr.images).permute(0, 3, 1, 2).contiguous(); HX = torch.from_numpy(he.images).permute(0, 3, 1, 2).float() / 255
hp = he.image_prompts(); hpairs = within_group_pairs(he.group); hids = tok(hp)
i_, j_ = hpairs.T; mF = np.abs(he.faithfulness[i_] - he.faithfulness[j_]) > 0
g = torch.Generator().manual_seed(0); t0 = time.time(); run = 0
for step in range(1, a.steps + 1):
    n = a.batch
    ia, ib = sample_pairs(tr, n, g, same_group=True)
    y = bradley_terry_labels(tr.oracle[ia], tr.oracle[ib], 0.05, g)
    flip = torch.rand(n, generator=g) < 0.5
    def batch(idx):
        x = X[torch.as_tensor(idx)].float() / 255
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    ps = [tr.prompts[tr.group[i]] for i in ia]; ps = [flip_prompt(p) if f else p for p, f in zip(ps, flip.tolist())]
    ids, mask = tok(ps * 2)
    raw = net(torch.cat([batch(ia), batch(ib)]), ids, mask)
    loss = F.binary_cross_entropy_with_logits(raw[:n] - raw[n:], y)
    d = b.sample_data(a.rbatch, g); cc, cl, pos, pres = targets(d.scenes); occ, ocl, opos = net.reader(d.images)
    aux = F.cross_entropy(occ.flatten(0, 2), cc.flatten()) + F.cross_entropy(ocl.flatten(0, 1), cl.flatten()) + ((opos - pos).square().sum(-1) * pres).sum() / pres.sum()
    opt.zero_grad(); (loss + aux).backward(); torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0); opt.step(); ema.update_parameters(net)
    run = 0.98 * run + 0.02 * float(loss.detach())
    if step % a.eval_every == 0:
        res = []
        for m in (ema.module, net):
            m.eval()
            with torch.no_grad(): s = torch.cat([m(HX[i:i+256], hids[0][i:i+256], hids[1][i:i+256]) for i in range(0, len(HX), 256)]).numpy()
            m.train(); res += [pairwise_agreement(s, he.oracle, hpairs)[0], pairwise_agreement(s, he.faithfulness, hpairs[mF])[0]]
        print(f"step {step} bt {run:.4f} aux {float(aux):.4f} held_ema {res[0]:.4f} F_ema {res[1]:.4f} held_raw {res[2]:.4f} F_raw {res[3]:.4f} t {time.time()-t0:.0f}s", flush=True)
