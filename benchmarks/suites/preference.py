"""Preference suite: mean reward per scorer over generated images (and per prompt, for CIs).

Which scorers: benchmarks.rewards.suite_rewards(backend, "preference") -- on shapes the
preference oracle and the learned shapes preference model, on real backends HPSv2.1,
ImageReward, PickScore and CLIPScore. Prompts: the GenEval (GenEval-shapes) prompts unless
--prompts gives others.
"""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm import tqdm

from benchmarks import rewards as bench_rewards
from benchmarks.geneval.suite import default_metadata
from benchmarks.suites.base import BackendInfo, ImageItem, SuiteResult, finite_mean, load_images, per_prompt_means
from rtdmd.rewards.registry import get_reward


class RewardSuite:
    """Score images with the registry's rewards for this suite; metrics ``reward/<name>``."""

    name = "preference"
    needs_geneval_metadata = False
    batch_size = 128

    def __init__(self, rewards: Sequence | None = None):
        self.rewards = list(rewards) if rewards is not None else None
        self.device = "cpu"

    def default_prompts(self, info: BackendInfo) -> list[dict]:
        return default_metadata(info)

    def load(self, info: BackendInfo, device: str = "cpu", workers: int = 0) -> None:
        self.device = device
        if self.rewards is None:
            names = bench_rewards.suite_rewards(info.name, self.name)
            self.rewards = [get_reward(n, backend=info, device=device) for n in names]

    @torch.no_grad()
    def score(self, items: Sequence[ImageItem], info: BackendInfo, seed: int = 0, progress: bool = True, work_dir=None) -> SuiteResult:
        names = [r.name for r in self.rewards]
        values: dict[str, list[float]] = {n: [] for n in names}
        bar = None
        if progress:
            bar = tqdm(total=len(items), desc=f"score {self.name}", unit="img", dynamic_ncols=True)
        for start in range(0, len(items), self.batch_size):
            chunk = items[start:start + self.batch_size]
            images = load_images(chunk).to(self.device)
            prompts = [it.metadata["prompt"] for it in chunk]
            for r in self.rewards:
                s = r(images, prompts)
                values[r.name].extend(float(v) for v in s.detach().float().cpu().reshape(-1))
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        per_image = [{"index": it.index, "k": it.k, "prompt": it.metadata["prompt"], "tag": it.metadata.get("tag", ""),
                      "filename": str(it.path), **{n: values[n][j] for n in names}} for j, it in enumerate(items)]
        metrics = {f"reward/{n}": finite_mean(values[n], n) for n in names}
        per_prompt = per_prompt_means(items, {f"reward/{n}": values[n] for n in names})
        tags = {"scorers": ";".join(f"{r.name}={r.identity}" for r in self.rewards)}
        return SuiteResult(metrics, per_image, per_prompt, tags)


class PreferenceSuite(RewardSuite):
    name = "preference"
