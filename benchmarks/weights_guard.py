"""Behaviour guard for refactors: a fixed-seed run of every method on toy2d and on a tiny shapes world,
fingerprinted by the sha256 of every tensor each run writes (inference weights, training weights, EMA
copies, optimiser moments).

    python -m benchmarks.weights_guard --write FILE     # record the fingerprints of this tree
    python -m benchmarks.weights_guard --check FILE     # exit 1 if any run's tensors differ
    python -m benchmarks.weights_guard --legacy-semantics --check benchmarks/weights_guard_legacy.json

``--legacy-semantics`` sets every training-semantics switch of docs/paper.md s4b to the behaviour before
those switches existed (EMA on generator updates without warm-up, the generator before the fake score, PPO and
BP + DM summed, no accumulation), which weights_guard_legacy.json recorded: the old path stays proven.

Two trees that print the same fingerprints train tensor-identical weights on CPU. The whole guard takes
about 20 s on one core.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from rtdmd.api import run_training
from rtdmd.checkpoint import find_checkpoint
from rtdmd.rewards.registry import register_reward

TOY = {"backend": {"hidden": 16, "depth": 2},
       "train": {"device": "cpu", "num_threads": 1, "batch_size": 16, "max_steps": 6, "checkpoint_every": 6, "log_every": 1},
       "tracking": {"enabled": False}}
SHAPES_BACKEND = {"image_size": 16, "size_range": [4.0, 6.0], "max_objects": 2, "unet_channels": [8, 16],
                  "unet_attention_head_dim": 4, "text_width": 16, "text_heads": 2, "text_layers": 1}
SHAPES = {"backend": SHAPES_BACKEND,
          "train": {"device": "cpu", "num_threads": 1, "batch_size": 8, "max_steps": 2, "checkpoint_every": 2, "log_every": 1},
          "tracking": {"enabled": False}}


#: the switches of docs/paper.md s4b at their pre-switch behaviour (--legacy-semantics)
LEGACY_TRAIN = {"ema_on": "update", "ema_warmup": False, "accumulate": 1, "ema_per_micro_batch": False}
LEGACY_METHOD = {"ac-dmd": {"fake_first": False}, "dmd2": {"fake_first": False},
                 "rtdmd": {"step_average": False, "stage1": {"fake_first": False}, "stage1_train": LEGACY_TRAIN}}
#: shipped values that changed with the switches: toy2d DMD2's EMA decay per iteration (0.9996^5 = 0.998 per generator step)
LEGACY_RUN = {"toy2d/dmd2": {"method": {"ema_decay": 0.998}}}


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _toy_reward(x, prompts):
    return torch.tanh(x[:, 0])


def _bright_reward(images, prompts):
    return images.mean(dim=(1, 2, 3))


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


def fingerprint(run_dir: Path) -> dict[str, str]:
    """sha256 per tensor file of the run's newest checkpoint (optimiser moments hashed from trainer.pt's tensors)."""

    step = find_checkpoint(run_dir)
    out = {}
    files = [step / "model.safetensors", *sorted((step / "state").glob("*.safetensors"))]
    for f in files:
        h = hashlib.sha256()
        for k, v in sorted(load_file(str(f)).items()):
            h.update(k.encode())
            h.update(_bytes(v))
        out[f.name if f.parent == step else f"state/{f.name}"] = h.hexdigest()[:16]
    objects = torch.load(step / "state" / "trainer.pt", map_location="cpu", weights_only=False)
    h = hashlib.sha256()
    for name, opt in sorted(objects["optimizers"].items()):
        for pid, st in sorted(opt["state"].items()):
            for k, v in sorted(st.items()):
                h.update(f"{name}/{pid}/{k}".encode())
                h.update(_bytes(torch.as_tensor(v)))
    out["optimizers"] = h.hexdigest()[:16]
    return out


def runs(root: Path, legacy: bool = False) -> dict[str, dict[str, str]]:
    register_reward("guard_right", _toy_reward, differentiable=True)
    register_reward("guard_bright", _bright_reward, differentiable=True)
    res: dict[str, dict[str, str]] = {}

    def go(key, method, over, **kw):
        out = root / key
        if legacy:
            over = _merge(_merge(over, {"train": LEGACY_TRAIN, "method": LEGACY_METHOD.get(method, {})}), LEGACY_RUN.get(key, {}))
        run_training(method, overrides=over, out=out, show_progress=False, **kw)
        sub = out / "stage2" if (out / "stage2").is_dir() else out
        res[key] = fingerprint(sub)
        print(f"{key}: {res[key]}", file=sys.stderr, flush=True)

    # toy2d: the exact-velocity teacher for the distillation methods
    go("toy2d/teacher", "teacher", _merge(TOY, {}), backend="toy2d")
    teacher = str(root / "toy2d/teacher")
    toy_t = _merge(TOY, {"backend": {"teacher": teacher}})
    for m in ("dmd2", "lcm", "hypersd"):
        go(f"toy2d/{m}", m, toy_t, backend="toy2d")
    go("toy2d/ac-dmd", "ac-dmd", _merge(toy_t, {"method": {"init": teacher}}), backend="toy2d")
    go("toy2d/flow-grpo", "flow-grpo", _merge(toy_t, {"method": {"rewards": {"guard_right": 1.0}, "group_size": 4}}),
       backend="toy2d")
    go("toy2d/rtdmd", "rtdmd", _merge(toy_t, {"method": {"rewards": {"guard_right": 1.0}, "group_size": 4,
                                                          "stage1": {"init": teacher},
                                                          "stage1_train": {"batch_size": 16, "max_steps": 6,
                                                                           "checkpoint_every": 6}}}),
       backend="toy2d")
    # shapes: a tiny random teacher (1 step), then every method from it
    go("shapes/teacher", "teacher", _merge(SHAPES, {"train": {"max_steps": 1, "checkpoint_every": 1}}), backend="shapes")
    sh_t = _merge(SHAPES, {"backend": {"teacher": str(root / "shapes/teacher")}})
    for m, extra in (("dmd2", {"method": {"ttur": 1, "prefetch": 0}}), ("lcm", {}), ("hypersd", {}),
                     ("ac-dmd", {"method": {"ttur": 1}})):
        go(f"shapes/{m}", m, _merge(sh_t, extra), backend="shapes")
    go("shapes/flow-grpo", "flow-grpo", _merge(sh_t, {"method": {"group_size": 4, "sampling_steps": 4, "train_steps": 2,
                                                                     "rewards": {"guard_bright": 1.0}}}),
       backend="shapes")
    go("shapes/rtdmd", "rtdmd", _merge(sh_t, {"method": {"group_size": 4, "rewards": {"guard_bright": 1.0, "geneval_partial": 1.0},
                                                          "stage1": {"ttur": 1},
                                                          "stage1_train": {"batch_size": 8, "max_steps": 2,
                                                                           "checkpoint_every": 2}}}),
       backend="shapes")
    go("shapes/reward", "reward", {"method": {"groups": 2, "heldout_groups": 1, "teacher_per_group": 0,
                                              "renders_per_group": 3, "pool_dir": str(root / "pools"), "width": 8,
                                              "groups_per_step": 2, "aesthetic_width": 8, "encoder_width": 8,
                                              "embed_dim": 8, "text_hidden": 8, "feature_dim": 16},
                                   "train": {"max_steps": 2, "batch_size": 4, "checkpoint_every": 2, "num_threads": 1,
                                             "device": "cpu"},
                                   "tracking": {"enabled": False}}, backend="shapes")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", type=Path)
    g.add_argument("--check", type=Path)
    ap.add_argument("--legacy-semantics", action="store_true",
                    help="train with the pre-switch semantics (compare with benchmarks/weights_guard_legacy.json)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        res = runs(Path(tmp), legacy=a.legacy_semantics)
    if a.write:
        a.write.write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
        print(f"wrote {len(res)} fingerprints to {a.write}")
        return 0
    want = json.loads(a.check.read_text())
    bad = [k for k in sorted(set(want) | set(res)) if want.get(k) != res.get(k)]
    for k in bad:
        print(f"DIFFERS {k}: {want.get(k)} -> {res.get(k)}")
    print(f"runs: {len(res)}, identical: {len(res) - len(bad)}, differ: {len(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
