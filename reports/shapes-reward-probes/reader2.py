"""Richer reader (class x colour counts, class centroids) trained on renders; then a BT head on its outputs."""
import argparse, time
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
torch.set_num_threads(int(__import__("os").environ.get("T", "1")))
from rtdmd.api import make_config
from rtdmd import registry
from rtdmd.methods.reward_model import architecture, load_or_build_pool
from rtdmd.world.shapes import GENEVAL_COLORS
from benchmarks.shapes.pairs import bradley_terry_labels, flip_prompt, sample_pairs, pairwise_agreement, within_group_pairs
from benchmarks.shapes.reward_models import load_bundle, PromptEncoder, ConvTrunk, MAX_COUNT
ap = argparse.ArgumentParser(); ap.add_argument("--rsteps", type=int, default=3000); ap.add_argument("--steps", type=int, default=8000)
ap.add_argument("--batch", type=int, default=128); ap.add_argument("--hidden", type=int, default=256); ap.add_argument("--width", type=int, default=32)
ap.add_argument("--dropout", type=float, default=0.1); ap.add_argument("--pcorrupt", type=float, default=0.7)
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
R = Reader(a.width); opt = torch.optim.AdamW(R.parameters(), lr=1e-3, weight_decay=1e-4)
g = torch.Generator().manual_seed(0); t0 = time.time()
from benchmarks.shapes.pairs import random_corruptions, corrupt_scene, corrupt_pixels, SCENE_CORRUPTIONS, PIXEL_CORRUPTIONS
from rtdmd.world.shapes import sample_training_example, render, to_uint8
nrng = np.random.default_rng(123)
def corrupted_batch(n):
    scenes, kl = [], []
    for i in range(n):
        sc, _ = sample_training_example(nrng, spec, 0.3)
        kinds = random_corruptions(nrng) if nrng.random() < a.pcorrupt else []
        for k in kinds:
            if k in SCENE_CORRUPTIONS: sc = corrupt_scene(sc, k, nrng, spec)
        scenes.append(sc); kl.append(kinds)
    x = render(scenes, spec).images
    out = []
    for i, kinds in enumerate(kl):
        im = x[i].numpy().astype(np.float64)
        for k in kinds:
            if k in PIXEL_CORRUPTIONS: im = corrupt_pixels(im, k, nrng, spec)
        out.append(torch.from_numpy(im).float())
    imgs = to_uint8(torch.stack(out)).astype(np.float32) / 255.0
    return scenes, torch.from_numpy(imgs).permute(0, 3, 1, 2) if imgs.shape[-1] == 3 else torch.from_numpy(imgs)
for step in range(1, a.rsteps + 1):
    scenes, images = corrupted_batch(64); cc, cl, pos, pres = targets(scenes)
    occ, ocl, opos = R(images)
    loss = F.cross_entropy(occ.flatten(0, 2), cc.flatten()) + F.cross_entropy(ocl.flatten(0, 1), cl.flatten()) + ((opos - pos).square().sum(-1) * pres).sum() / pres.sum()
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 500 == 0:
        acc = (occ.argmax(-1) == cc).all(2).all(1).float().mean()
        print(f"reader {step} loss {loss.item():.4f} cc_acc {acc:.3f} t {time.time()-t0:.0f}s", flush=True)
arch = architecture(cfg.method, b); tok = arch.tokenizer()
tr = load_or_build_pool(cfg.method, b, "train", progress=False); he = load_or_build_pool(cfg.method, b, "heldout", progress=False)
bd = load_bundle(); R.eval()
@torch.no_grad()
def feats(pool, flip):
    X = torch.from_numpy(pool.images).permute(0, 3, 1, 2).float() / 255
    if flip: X = X.flip(-1)
    outs = []
    for i in range(0, len(X), 256):
        x = X[i:i+256]; occ, ocl, opos = R(x)
        outs.append(torch.cat([occ.softmax(-1).flatten(1), ocl.softmax(-1).flatten(1), opos.flatten(1), bd.aesthetic(x)[:, None] * 0.05], 1))
    return torch.cat(outs)
TF = [feats(tr, False), feats(tr, True)]; HF = feats(he, False)
print("features", TF[0].shape, f"{time.time()-t0:.0f}s", flush=True)
torch.save({"TF": TF, "HF": HF}, "/tmp/rexp/reader2_feats.pt"); torch.save(R.state_dict(), "/tmp/rexp/reader2.pt")
class Head(nn.Module):
    def __init__(s, d, vocab):
        super().__init__(); s.text = PromptEncoder(vocab, 32, 64)
        s.net = nn.Sequential(nn.Linear(d + 128, a.hidden), nn.SiLU(), nn.Dropout(a.dropout), nn.Linear(a.hidden, a.hidden), nn.SiLU(), nn.Dropout(a.dropout), nn.Linear(a.hidden, 1))
    def forward(s, f, ids, mask):
        return s.net(torch.cat([f, s.text(ids, mask)], 1))[:, 0]
net = Head(TF[0].shape[1], len(arch.vocab) + 4)
opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
hp = he.image_prompts(); hpairs = within_group_pairs(he.group); hids = tok(hp)
i_, j_ = hpairs.T; mF = np.abs(he.faithfulness[i_] - he.faithfulness[j_]) > 0
run = 0
for step in range(1, a.steps + 1):
    net.train(); n = a.batch
    ia, ib = sample_pairs(tr, n, g, same_group=True)
    y = bradley_terry_labels(tr.oracle[ia], tr.oracle[ib], 0.05, g)
    flip = torch.rand(n, generator=g) < 0.5
    fa = torch.where(flip[:, None], TF[1][ia], TF[0][ia]); fb = torch.where(flip[:, None], TF[1][ib], TF[0][ib])
    ps = [tr.prompts[tr.group[i]] for i in ia]; ps = [flip_prompt(p) if f else p for p, f in zip(ps, flip.tolist())]
    ids, mask = tok(ps)
    d = net(fa, ids, mask) - net(fb, ids, mask)
    loss = F.binary_cross_entropy_with_logits(d, y)
    opt.zero_grad(); loss.backward(); opt.step(); run = 0.98 * run + 0.02 * loss.item()
    if step % 1000 == 0:
        net.eval()
        with torch.no_grad(): s = net(HF, *hids).numpy()
        print(f"step {step} loss {run:.4f} held {pairwise_agreement(s, he.oracle, hpairs)[0]:.4f} F {pairwise_agreement(s, he.faithfulness, hpairs[mF])[0]:.4f} t {time.time()-t0:.0f}s", flush=True)
