"""Build part of the reward training pool, so that several processes share the work of one pool; used to grow the
pool from 1,200 to 4,800 groups for the second bundle (two processes, shards 13-47; about 47 s per 100-group
shard on one core). `rtdmd-bench train reward` then finds every shard built and only loads the pool.

With --copy-from, shards of a smaller pool with the same settings are copied instead of rebuilt: groups are
seeded by their index (benchmarks.shapes.pairs), so the first groups of every pool are the same images.

    python reports/shapes-reward-probes/build_pool_shards.py --groups 4800 --lo 0 --hi 13 \
        --copy-from ~/.cache/rtdmd-bench/shapes_reward_pool/train-cb9c709c8d0deb77
    python reports/shapes-reward-probes/build_pool_shards.py --groups 4800 --lo 13 --hi 48
"""
import argparse
import shutil
from pathlib import Path

import torch

from rtdmd import registry
from rtdmd.api import make_config
from rtdmd.methods.reward_model import load_or_build_pool, pool_location

torch.set_num_threads(1)
ap = argparse.ArgumentParser()
ap.add_argument("--groups", type=int, required=True, help="groups of the whole pool (method.groups)")
ap.add_argument("--lo", type=int, required=True, help="first shard to build")
ap.add_argument("--hi", type=int, required=True, help="one past the last shard to build")
ap.add_argument("--copy-from", type=Path, help="cache folder of a smaller pool with the same other settings")
a = ap.parse_args()
cfg = make_config("reward", backend="shapes", overrides={"method": {"groups": a.groups}})
backend = registry.get_backend("shapes").factory(cfg.backend, torch.device("cpu"))
_, _, directory = pool_location(cfg.method, backend, "train")
shards = list(range(a.lo, a.hi))
if a.copy_from is not None:
    src = a.copy_from.expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    for label_dir in (src / "labels").iterdir():
        (directory / "labels" / label_dir.name).mkdir(parents=True, exist_ok=True)
    for i in list(shards):
        images = src / f"images_{i:04d}.npz"
        if images.is_file():
            shutil.copy(images, directory / images.name)
            for label_dir in (src / "labels").iterdir():
                if (label_dir / f"shard_{i:04d}.npz").is_file():
                    shutil.copy(label_dir / f"shard_{i:04d}.npz", directory / "labels" / label_dir.name / f"shard_{i:04d}.npz")
load_or_build_pool(cfg.method, backend, "train", shards=shards)  # builds what the copies did not cover
print(f"shards {a.lo}-{a.hi - 1} of {directory}: built or copied", flush=True)
