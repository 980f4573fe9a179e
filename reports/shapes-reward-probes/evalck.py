"""Held-out agreement of a 'train reward' checkpoint, taken apart (docs/shapes-rewards.md, "How the rewards reached
85 %"): on all within-prompt pairs, on pairs whose faithfulness F differs (agreement with F) and on pairs of equal F;
for the aesthetic model alone, the preference model with its checks sharpened, with its aesthetic weight scaled by
hand, and with the mirror average. Single view unless a line says mirror.

    python reports/shapes-reward-probes/evalck.py runs/reward-shapes-v2
"""
import sys

import torch

from benchmarks.shapes import reward_models as RM
from benchmarks.shapes.pairs import flip_prompt, pairwise_agreement, within_group_pairs
from rtdmd import registry
from rtdmd.checkpoint import find_checkpoint
from rtdmd.config import load_resolved
from rtdmd.methods.reward_model import load_or_build_pool

torch.set_num_threads(1)
step = find_checkpoint(sys.argv[1])
print(step)
cfg = load_resolved(step / "config.yaml")
pool = load_or_build_pool(cfg.method, registry.get_backend("shapes").factory(cfg.backend, "cpu"), "heldout", progress=False)
b = RM.load_bundle(step)
x = torch.from_numpy(pool.images).permute(0, 3, 1, 2).float() / 255
P = within_group_pairs(pool.group)
f_differs = pool.faithfulness[P[:, 0]] != pool.faithfulness[P[:, 1]]


def rep(name, s):
    s = s.numpy()
    print(f"{name:24s} all {pairwise_agreement(s, pool.oracle, P)[0]:.4f}  "
          f"Fdiff(vs F) {pairwise_agreement(s, pool.faithfulness, P[f_differs])[0]:.4f}  "
          f"Fsame {pairwise_agreement(s, pool.oracle, P[~f_differs])[0]:.4f}", flush=True)


@torch.no_grad()
def view(images, prompts):
    """(check logits or the FiLM net's raw output, aesthetic logit) over the pool, in batches."""
    ids, mask = b.tokenize(prompts, "cpu")
    net, out, aes = b.preference, [], []
    for k in range(0, len(images), 512):
        xi, ii, mi = images[k:k + 512], ids[k:k + 512], mask[k:k + 512]
        if isinstance(net, RM.ReaderPreferenceNet):
            out.append(net.checks(torch.cat([net.reader.read(xi, net.with_hidden), net.text(ii, mi)], 1)))
        else:
            out.append(net(xi, ii, mi))
        aes.append(b.aesthetic(xi))
    return torch.cat(out), torch.cat(aes)


logits, aes = view(x, pool.image_prompts())
rep("aesthetic alone", aes)
print("aesthetic vs Q", round(pairwise_agreement(aes.numpy(), pool.quality, P)[0], 4))
net = b.preference
if isinstance(net, RM.ReaderPreferenceNet):
    wf, wq = net.log_w_faithful.exp().detach(), net.log_w_quality.exp().detach()
    print("wF", float(wf), "wQ", float(wq))
    for sharp in (1, 2, 4, 8, 1000):
        rep(f"sharpness {sharp}", wf * torch.sigmoid(sharp * logits).mean(1) + wq * aes)
    logits_m, aes_m = view(x.flip(-1), [flip_prompt(p) for p in pool.image_prompts()])
    f1, f2 = torch.sigmoid(logits).mean(1), torch.sigmoid(logits_m).mean(1)
    for m in (1.0, 1.5, 2.0, 3.0):
        rep(f"wQ x{m}", wf * f1 + m * wq * aes)
        rep(f"wQ x{m} + mirror", wf * (f1 + f2) / 2 + m * wq * (aes + aes_m) / 2)
else:
    rep("film", logits)
