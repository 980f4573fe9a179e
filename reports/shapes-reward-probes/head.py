"""Head on frozen shipped encoder outputs (+ aes score) trained on BT pairs: potential check."""
import argparse, time
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
torch.set_num_threads(1)
from rtdmd.api import make_config
from rtdmd import registry
from rtdmd.methods.reward_model import architecture, load_or_build_pool
from benchmarks.shapes.pairs import bradley_terry_labels, flip_prompt, sample_pairs, pairwise_agreement, within_group_pairs
from benchmarks.shapes.reward_models import load_bundle, PromptEncoder
ap = argparse.ArgumentParser(); ap.add_argument("--steps", type=int, default=20000); ap.add_argument("--batch", type=int, default=128)
ap.add_argument("--noaes", action="store_true"); ap.add_argument("--hidden", type=int, default=256)
a = ap.parse_args()
cfg = make_config("reward", backend="shapes")
b = registry.get_backend("shapes").factory(cfg.backend, torch.device("cpu"))
arch = architecture(cfg.method, b); tok = arch.tokenizer()
tr = load_or_build_pool(cfg.method, b, "train", progress=False); he = load_or_build_pool(cfg.method, b, "heldout", progress=False)
bd = load_bundle()
@torch.no_grad()
def feats(pool, flip):
    X = torch.from_numpy(pool.images).permute(0, 3, 1, 2).float() / 255
    if flip: X = X.flip(-1)
    outs = []
    for i in range(0, len(X), 256):
        x = X[i:i+256]; o = bd.encoder(x)
        f = [o["class_counts"].softmax(-1).flatten(1), o["color_counts"].softmax(-1).flatten(1), o["occupancy"].sigmoid(), bd.encoder.features(x)]
        if not a.noaes: f.append(bd.aesthetic(x)[:, None] * 0.05)
        outs.append(torch.cat(f, 1))
    return torch.cat(outs)
t0 = time.time()
TF = [feats(tr, False), feats(tr, True)]; HF = feats(he, False)
print("features", TF[0].shape, f"{time.time()-t0:.0f}s", flush=True)
def prompt_ids(prompts):
    return tok(prompts)
class Head(nn.Module):
    def __init__(self, d, vocab):
        super().__init__(); self.text = PromptEncoder(vocab, 32, 64)
        self.net = nn.Sequential(nn.Linear(d + 128, a.hidden), nn.SiLU(), nn.Linear(a.hidden, a.hidden), nn.SiLU(), nn.Linear(a.hidden, 1))
    def forward(self, f, ids, mask):
        return self.net(torch.cat([f, self.text(ids, mask)], 1))[:, 0]
net = Head(TF[0].shape[1], len(arch.vocab) + 4)
opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
g = torch.Generator().manual_seed(0)
hp = he.image_prompts(); hpairs = within_group_pairs(he.group); hids = tok(hp)
i_, j_ = hpairs.T; mF = np.abs(he.faithfulness[i_] - he.faithfulness[j_]) > 0
run = 0
for step in range(1, a.steps + 1):
    n = a.batch
    ia, ib = sample_pairs(tr, n, g, same_group=True)
    y = bradley_terry_labels(tr.oracle[ia], tr.oracle[ib], 0.05, g)
    flip = torch.rand(n, generator=g) < 0.5
    fa = torch.where(flip[:, None], TF[1][ia], TF[0][ia]); fb = torch.where(flip[:, None], TF[1][ib], TF[0][ib])
    ps = [tr.prompts[tr.group[i]] for i in ia]; ps = [flip_prompt(p) if f else p for p, f in zip(ps, flip.tolist())]
    ids, mask = tok(ps)
    d = net(fa, ids, mask) - net(fb, ids, mask)
    loss = F.binary_cross_entropy_with_logits(d, y)
    opt.zero_grad(); loss.backward(); opt.step(); run = 0.98 * run + 0.02 * loss.item()
    if step % 2000 == 0:
        with torch.no_grad(): s = net(HF, *hids).numpy()
        print(f"step {step} loss {run:.4f} held {pairwise_agreement(s, he.oracle, hpairs)[0]:.4f} F {pairwise_agreement(s, he.faithfulness, hpairs[mF])[0]:.4f} t {time.time()-t0:.0f}s", flush=True)
