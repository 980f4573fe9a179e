"""The learned shapes rewards and the shapes encoder, trained on the project's trainer.

Three networks, each with its own update: ``preference`` r(image, prompt) and
``aesthetic`` a(image) learn from pairwise comparisons labelled by the preference oracle
through Bradley-Terry noise, P(a > b) = sigmoid((o_a - o_b) / T) (o: the oracle for the
preference model, its quality part Q for the aesthetic model); ``encoder`` (the FD-shapes
feature extractor) learns to read object counts, colours and positions from renders.
Pairs come from a cached pool of teacher samples and corrupted renders
(benchmarks.shapes.pairs); the networks live in benchmarks.shapes.reward_nets. The method is
``rtdmd-bench train reward`` (entry point ``reward`` of rtdmd_bench.methods); its config is
rtdmd/configs/shapes/reward.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.shapes.oracle import PreferenceOracle
from benchmarks.shapes.pairs import (PoolConfig, all_pairs, bradley_terry_labels, build_pool, flip_prompt,
                                     sample_groups, sample_pairs)
from benchmarks.shapes.reward_nets import (NETWORKS, Architecture, encoder_loss, encoder_targets, reader_loss,
                                           reader_targets)
from rtdmd.checkpoint import read_meta
from rtdmd.config import OptimConfig, RunConfig
from rtdmd.errors import UserError
from rtdmd.generate import SamplingConfig, generate
from rtdmd.methods.base import Method, SamplerSpec, StepContext, Update
from rtdmd.registry import register_method
from rtdmd.world.shapes import vocabulary

DEFAULT_POOL_ROOT = Path("~/.cache/rtdmd-bench/shapes_reward_pool")


@dataclass
class RewardModelOptions:
    temperature: float = 0.05  # Bradley-Terry temperature on the oracle (preference model)
    quality_temperature: float = 0.05  # ... on the oracle's quality part Q (aesthetic model)
    # --- networks (benchmarks.shapes.reward_nets)
    width: int = 32
    aesthetic_width: int = 24
    encoder_width: int = 24
    embed_dim: int = 32
    text_hidden: int = 64
    feature_dim: int = 64
    # --- training
    flip: bool = True  # mirror pairs and swap "left of" / "right of": an exact symmetry of the world and the oracle
    # group: each step draws method.groups_per_step prompt groups and labels every pair among their images (within
    # a group for the preference model, any two for the aesthetic model): 28 pairs per 8-image group for the cost
    # of 8 images. independent: train.batch_size independent pairs (two images each).
    pairs: Literal["group", "independent"] = "group"
    groups_per_step: int = 8
    # film: a FiLM-conditioned CNN; reader: a scene reader (also trained on method.reader_batch fresh renders per
    # step) whose reading and the caption give method.checks soft checks, plus the aesthetic model's score
    preference_net: Literal["film", "reader"] = "film"
    checks: int = 4
    check_inputs: Literal["reading", "reading+hidden"] = "reading"  # + the reader's hidden features
    mirror_average: bool = True  # the bundle's scores average the image and its mirror (prompt's left / right swapped)
    reader_batch: int = 32
    reader_weight: float = 1.0
    calibration_momentum: float = 0.99  # running offset that puts scale * raw + offset in oracle units
    ema_decay: float | None = 0.999  # EMA copies of all three networks (bundles use them); null: none
    encoder_every: int = 1
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=1e-4))
    # --- the pool (benchmarks.shapes.pairs.PoolConfig)
    pool_dir: str = ""  # "" -> ~/.cache/rtdmd-bench/shapes_reward_pool/<split>-<hash of the pool settings>
    groups: int = 1200
    heldout_groups: int = 200  # the held-out pool used when the rewards are evaluated and exported
    teacher_per_group: int = 2
    renders_per_group: int = 6
    teacher_settings: list[list[float]] = field(default_factory=lambda: [[3, 1.0], [4, 1.0], [6, 2.0], [8, 3.0], [12, 4.0]])
    corruption_counts: list[float] = field(default_factory=lambda: [0.1, 0.4, 0.35, 0.15])
    pool_seed: int = 0

    def validate(self):
        if self.temperature <= 0 or self.quality_temperature <= 0:
            raise UserError("method.temperature and method.quality_temperature must be positive (e.g. 0.05).")
        if not 0.0 <= self.calibration_momentum < 1.0:
            raise UserError("method.calibration_momentum must be in [0, 1); 0.99 is the default.")
        if self.groups <= 0 or self.heldout_groups <= 0:
            raise UserError("method.groups and method.heldout_groups must be positive.")
        if self.teacher_per_group < 0 or self.renders_per_group < 0 or self.teacher_per_group + self.renders_per_group < 2:
            raise UserError("each pool group needs at least 2 images; raise method.teacher_per_group or method.renders_per_group.")
        if self.teacher_per_group and not self.teacher_settings:
            raise UserError("method.teacher_settings is empty; give [steps, guidance] pairs or set teacher_per_group=0.")
        if any(len(s) != 2 or s[0] < 1 for s in self.teacher_settings):
            raise UserError("method.teacher_settings must be [steps, guidance] pairs with steps >= 1.")
        if len(self.corruption_counts) < 1 or any(p < 0 for p in self.corruption_counts) or sum(self.corruption_counts) <= 0:
            raise UserError("method.corruption_counts must be non-negative probabilities of 0, 1, 2 ... corruptions.")
        if len(self.corruption_counts) > 6:
            raise UserError("method.corruption_counts allows at most 5 corruptions per image; shorten the list.")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise UserError("method.ema_decay must be in [0, 1) or null.")
        if self.checks < 1 or self.reader_batch < 1 or self.reader_weight < 0:
            raise UserError("method.checks and method.reader_batch must be at least 1 and method.reader_weight >= 0.")
        if self.groups_per_step < 1:
            raise UserError("method.groups_per_step must be at least 1 (8 is the default).")
        if self.encoder_every < 1:
            raise UserError("method.encoder_every must be at least 1.")


def pool_config(o: RewardModelOptions, split: str, distractor_prob: float):
    return PoolConfig(split=split, groups=o.groups if split == "train" else o.heldout_groups,
                      teacher_per_group=o.teacher_per_group, renders_per_group=o.renders_per_group,
                      teacher_settings=[list(s) for s in o.teacher_settings], corruption_counts=list(o.corruption_counts),
                      distractor_prob=distractor_prob, seed=o.pool_seed)


def architecture(o: RewardModelOptions, backend):
    return Architecture(vocab=vocabulary(backend.spec), n_classes=len(backend.spec.classes), width=o.width,
                        aesthetic_width=o.aesthetic_width, encoder_width=o.encoder_width, embed_dim=o.embed_dim,
                        text_hidden=o.text_hidden, feature_dim=o.feature_dim, temperature=o.temperature,
                        quality_temperature=o.quality_temperature, max_tokens=backend.options.max_tokens,
                        preference_net=o.preference_net, checks=o.checks, check_inputs=o.check_inputs,
                        mirror_average=o.mirror_average)


def pool_location(o: RewardModelOptions, backend, split: str):
    """(PoolConfig, cache key, cache folder) of the pool of ``split`` (see RewardModelOptions.pool_dir)."""
    pc = pool_config(o, split, backend.options.distractor_prob)
    teacher_id = "none"
    if pc.teacher_per_group:
        teacher_id = read_meta(backend.teacher_dir()).get("model_sha256", "unknown")
    world = {"image_size": backend.spec.image_size, "classes": list(backend.spec.classes),
             "size_range": list(backend.spec.size_range), "max_objects": backend.spec.max_objects}
    key = pc.key(world, teacher_id)
    root = Path(o.pool_dir).expanduser() if o.pool_dir else DEFAULT_POOL_ROOT.expanduser()
    return pc, key, root / f"{split}-{key}"


def load_or_build_pool(o: RewardModelOptions, backend, split: str, progress: bool = True, shards=None):
    """The pool of ``split`` ("train" / "heldout"), built once and cached (see RewardModelOptions.pool_dir).

    ``shards``: build (and label) only these shards and return None, so that several processes can share the
    work of one pool; a later call without it finds them and builds the rest.
    """
    pc, key, directory = pool_location(o, backend, split)

    def teacher(prompts, keys, steps, guidance):
        return generate(backend, backend.teacher, prompts, keys, SamplingConfig("euler", steps, guidance))

    return build_pool(pc, backend.spec, directory, teacher, PreferenceOracle(backend.spec), key=key,
                            progress=progress, shards=shards)


class RewardModelMethod(Method):
    inference_network = "preference"

    def __init__(self, cfg: RunConfig, backend):
        super().__init__(cfg, backend)
        o = self.options
        self.arch = architecture(o, backend)
        self.tokenizer = self.arch.tokenizer()
        for n in NETWORKS:
            self.networks[n] = self.arch.build(n).to(backend.device)
        self.updates = [Update("preference", optim=o.optim, ema_decay=o.ema_decay),
                        Update("aesthetic", optim=o.optim, ema_decay=o.ema_decay),
                        Update("encoder", every=o.encoder_every, optim=o.optim, ema_decay=o.ema_decay)]
        self.pool = load_or_build_pool(o, backend, "train")
        self._images = torch.from_numpy(self.pool.images).permute(0, 3, 1, 2).contiguous()  # uint8 (N, 3, H, W)

    # ------------------------------------------------------------------ data
    def _batch(self, idx, flip: torch.Tensor) -> torch.Tensor:
        x = self._images[torch.as_tensor(idx)].float().div_(255.0)
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x.to(self.backend.device)

    def _draw_pairs(self, pref: bool, ref, temp: float, ctx: StepContext):
        """This process's share of the step's pairs: (pool indices of its images, pair positions a / b into them,
        Bradley-Terry labels, mirror flag per image). All random draws cover the whole step (every process makes
        the same ones), then the pairs are split by group (group mode) or by row (independent)."""
        o, g = self.options, ctx.generator
        if o.pairs == "group":
            n = o.groups_per_step
            idx, slot = sample_groups(self.pool, n, g)
            # one mirror decision per group, so every image of a prompt keeps the same caption
            flip = ((torch.rand(n, generator=g) < 0.5) & torch.tensor(bool(o.flip)))[torch.as_tensor(slot)]
            a, b = all_pairs(slot, same_group=pref)
            y = bradley_terry_labels(ref[idx[a]], ref[idx[b]], temp, g)
            sl = ctx.shard(n)
            mine = (slot >= sl.start) & (slot < sl.stop)
            keep = mine[a] & mine[b]
            local = np.cumsum(mine) - 1  # position of each of this process's images among them
            return idx[mine], local[a[keep]], local[b[keep]], y[torch.as_tensor(keep)], flip[torch.as_tensor(mine)]
        n = self.cfg.train.batch_size
        ia, ib = sample_pairs(self.pool, n, g, same_group=pref)
        y = bradley_terry_labels(ref[ia], ref[ib], temp, g)
        flip = (torch.rand(n, generator=g) < 0.5) & torch.tensor(bool(o.flip))  # one decision per pair
        sl = ctx.shard(n)
        ia, ib, y, flip = ia[sl], ib[sl], y[sl], flip[sl]
        m = len(ia)
        return np.concatenate([ia, ib]), np.arange(m), np.arange(m, 2 * m), y, flip.repeat(2)

    def _pair_loss(self, network: str, ctx: StepContext):
        o, pool = self.options, self.pool
        pref = network == "preference"
        ref = pool.oracle if pref else pool.quality
        temp = o.temperature if pref else o.quality_temperature
        idx, a, b, y, flip = self._draw_pairs(pref, ref, temp, ctx)
        y = y.to(self.backend.device)
        images = self._batch(idx, flip)
        net = self.networks[network]
        if pref:
            prompts = [pool.prompts[pool.group[i]] for i in idx]
            prompts = [flip_prompt(p) if f else p for p, f in zip(prompts, flip.tolist())]
            ids, mask = self.tokenizer(prompts)
            ids, mask = ids.to(images.device), mask.to(images.device)
            if o.preference_net == "reader":
                return self._reader_preference_loss(net, images, ids, mask, a, b, y, ref[idx], ctx)
            raw = net(images, ids, mask)
        else:
            raw = net(images)
        return self._bradley_terry(network, net, raw, a, b, y, ref[idx])

    def _reader_preference_loss(self, net, images, ids, mask, a, b, y, ref, ctx: StepContext):
        o = self.options
        with torch.no_grad():  # the aesthetic model is an input here, trained by its own update
            quality = self.networks["aesthetic"](images)
        n = o.reader_batch
        data = self.backend.sample_data(n, ctx.generator)
        sl = ctx.shard(n)
        targets = {k: v[sl].to(images.device) for k, v in reader_targets(data.scenes, self.backend.spec).items()}
        raw, read = net(images, ids, mask, quality, renders=data.images[sl].to(images.device))
        loss, logs = self._bradley_terry("preference", net, raw, a, b, y, ref)
        aux, aux_logs = reader_loss(read, targets)
        return loss + o.reader_weight * aux, {**logs, **aux_logs, "loss/reader": float(aux.detach())}

    def _bradley_terry(self, network: str, net, raw, a, b, y, ref):
        """Bradley-Terry loss of raw[a] - raw[b] against labels y; updates the calibration; batch agreement."""
        o = self.options
        d = raw[torch.as_tensor(a)] - raw[torch.as_tensor(b)]
        loss = F.binary_cross_entropy_with_logits(d, y)
        target = torch.as_tensor(ref, dtype=torch.float32, device=raw.device)
        getattr(net, "module", net).calibrate(raw, target, o.calibration_momentum)
        with torch.no_grad():
            dref = torch.as_tensor(ref[a] - ref[b], dtype=torch.float32, device=d.device)
            valid = dref != 0
            agree = ((d.sign() == dref.sign()) & valid).float().sum() / valid.float().sum().clamp(min=1)
        return loss, {f"{network}/batch_agreement": float(agree)}

    def _encoder_loss(self, ctx: StepContext):
        n = self.cfg.train.batch_size
        data = self.backend.sample_data(n, ctx.generator)
        sl = ctx.shard(n)
        targets = {k: v[sl].to(self.backend.device) for k, v in encoder_targets(data.scenes, self.backend.spec).items()}
        out = self.networks["encoder"](data.images[sl])
        return encoder_loss(out, targets)

    # ------------------------------------------------------------------ Method API
    def loss(self, network, ctx: StepContext):
        if network == "encoder":
            return self._encoder_loss(ctx)
        return self._pair_loss(network, ctx)

    def sampler(self):
        # nothing here samples images; the field is required in every checkpoint's meta.json
        return SamplerSpec(kind="none", steps=0)

    def inference_role(self):
        return "preference"


@register_method("reward", RewardModelOptions, backends=("shapes",), default_backend="shapes",
                 help="train the learned shapes rewards (preference, aesthetic) and the FD-shapes encoder")
def make_reward_model(cfg: RunConfig, backend) -> RewardModelMethod:
    return RewardModelMethod(cfg, backend)
