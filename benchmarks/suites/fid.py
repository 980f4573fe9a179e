"""Distribution suite: FD-shapes on the shapes backend, clean-fid FID on real backends.

Shapes: benchmarks.shapes.fd.fd_shapes between the generated images and renders of the
same prompts by the world's renderer (reference_renders, the same number of images per
prompt, a fixed reference seed so every model meets the same reference set); the generated
images' features and the reference statistics are kept in the eval folder (FD_FEATURES), for
bootstrap intervals over images (benchmarks.study.stats.fd_bootstrap).
Real backends: benchmarks.fid.clean_fid_score over a flat folder of the generated PNGs
(hard links) against --fid-reference (a folder, an .npz of mu/sigma, or a clean-fid
statistics name already on disk).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Sequence

from benchmarks.fid import clean_fid_score, find_inception, save_fd_features
from benchmarks.geneval.suite import default_metadata
from benchmarks.scorers.common import identity_of
from benchmarks.shapes import reward_models
from benchmarks.shapes.fd import fd_shapes_parts, reference_renders
from benchmarks.suites.base import BackendInfo, ImageItem, SuiteResult, load_images
from rtdmd.errors import UserError
from rtdmd.world.shapes import parse_caption

#: seed of the shapes reference renders (fixed: all models and eval seeds share one reference)
REFERENCE_SEED = 0
#: the shapes FD's per-image features and reference statistics, in the suite's eval folder (benchmarks.fid.save_fd_features)
FD_FEATURES = "fd_features.npz"


def flat_folder(items: Sequence[ImageItem], folder: Path) -> Path:
    """A flat folder of the items' PNGs (hard links, copies where links fail), named <index>_<k>.png."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for it in items:
        dst = folder / f"{it.index:05d}_{it.k:05d}.png"
        try:
            os.link(it.path, dst)
        except OSError:
            shutil.copyfile(it.path, dst)
    return folder


def _scene_metadata(entry: dict, info: BackendInfo) -> dict:
    """GenEval entries as they are; a plain prompt is parsed by the world's caption grammar."""
    if "include" in entry:
        return entry
    return parse_caption(entry["prompt"], info.spec)


class FIDSuite:
    name = "fid"
    needs_geneval_metadata = False

    def __init__(self, reference: str | None = None, inception_path: str | None = None):
        self.reference = reference
        self.inception_path = inception_path
        self.device = "cpu"
        self.identity = ""

    def default_prompts(self, info: BackendInfo) -> list[dict]:
        return default_metadata(info)

    def load(self, info: BackendInfo, device: str = "cpu", workers: int = 0) -> None:
        self.device = device
        if info.name == "shapes":
            self.identity = f"shapes_encoder={reward_models.load_bundle(device=device).identity}"  # fails early without weights
            return
        if not self.reference:
            raise UserError("the fid suite on a real backend needs --fid-reference (a folder of reference images, an .npz "
                            "with mu and sigma, or a clean-fid statistics name on disk); pass one.")
        # fail before generating when the Inception file is absent
        self.identity = f"inception={identity_of(find_inception(self.inception_path))}"

    def score(self, items: Sequence[ImageItem], info: BackendInfo, seed: int = 0, progress: bool = True,
              work_dir: Path | None = None) -> SuiteResult:
        if len(items) < 2:
            raise UserError(f"the fid suite needs at least 2 images, got {len(items)}; raise --max-prompts or --images-per-prompt.")
        per_image = [{"index": it.index, "k": it.k, "prompt": it.metadata["prompt"], "filename": str(it.path)} for it in items]
        if info.name == "shapes":
            by_index: dict[int, dict] = {}
            counts: dict[int, int] = {}
            for it in items:
                by_index[it.index] = it.metadata
                counts[it.index] = counts.get(it.index, 0) + 1
            per_prompt = max(counts.values())
            gen = load_images(items)
            ref = reference_renders([_scene_metadata(by_index[i], info) for i in sorted(by_index)], per_prompt,
                                    REFERENCE_SEED, spec=info.spec)
            value, feats, ref_mu, ref_sigma = fd_shapes_parts(gen, ref)
            if work_dir is not None:  # per-image features: a study bootstraps FD over images (benchmarks.study.stats)
                save_fd_features(Path(work_dir) / FD_FEATURES, [(it.index, it.k) for it in items], feats, ref_mu, ref_sigma)
            value = float(value)
            return SuiteResult({"fd_shapes": value}, per_image, [],
                               {"fd_reference": f"renders seed {REFERENCE_SEED} x{per_prompt}", "scorers": self.identity})
        folder = flat_folder(items, Path(work_dir or Path(items[0].path).parents[2]) / "fid_flat")
        value = clean_fid_score(folder, self.reference, device=self.device, inception_path=self.inception_path)
        shutil.rmtree(folder, ignore_errors=True)
        return SuiteResult({"fid": value}, per_image, [], {"fid_reference": str(self.reference), "scorers": self.identity})
