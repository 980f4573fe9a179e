"""Shared plumbing for the real scorers: weight resolution, identity, preprocessing, batching.

Weights are never downloaded: a scorer takes a local path or a hub id that must already be
in the local Hugging Face cache (resolved with ``local_files_only=True``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import hf_hub_download, snapshot_download
from PIL import Image

from rtdmd.errors import UserError

#: where weights that are not on the Hugging Face hub are looked for by default
DEFAULT_WEIGHTS_DIR = Path("~/.cache/rtdmd-bench/weights").expanduser()

#: OpenAI CLIP normalisation (also used by BLIP / ImageReward and HPSv2)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _looks_like_path(spec: str) -> bool:
    # hub ids are "name" or "owner/name"; anything else is meant as a filesystem path
    suffix = Path(spec).suffix
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or suffix in (".pt", ".pth", ".bin", ".safetensors")


def _download_hint(repo_id: str, filename: str | None = None) -> str:
    what = f"{repo_id} {filename}" if filename else repo_id
    return f"`huggingface-cli download {what} --local-dir <dir>` on a machine with network, then pass <dir>"


def resolve_dir(spec: str, what: str, required: Sequence[str] = ()) -> Path:
    """A local directory, or a hub repo id already in the local HF cache -> its directory."""
    path = Path(spec).expanduser()
    if path.is_dir():
        missing = [f for f in required if not (path / f).exists()]
        if missing:
            raise UserError(f"{what}: directory {path} lacks {', '.join(missing)}; pass a complete copy of the model.")
        return path
    if _looks_like_path(spec):
        raise UserError(f"{what}: no directory at {path}; copy the weights there or pass another path.")
    try:
        found = Path(snapshot_download(repo_id=spec, local_files_only=True))
    except Exception as exc:  # huggingface_hub raises several types for "not cached"
        raise UserError(
            f"{what}: hub id '{spec}' is not in the local Hugging Face cache ({type(exc).__name__}); "
            f"run {_download_hint(spec)} as the path."
        ) from None
    return resolve_dir(str(found), what, required)


def resolve_file(spec: str, what: str, repo_filename: tuple[str, str] | None = None) -> Path:
    """A file path, a directory holding the expected file, or (repo, filename) from the local HF cache."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.is_dir() and repo_filename and (path / repo_filename[1]).is_file():
        return path / repo_filename[1]
    if repo_filename and spec == repo_filename[0]:
        try:
            return Path(hf_hub_download(repo_filename[0], repo_filename[1], local_files_only=True))
        except Exception as exc:
            raise UserError(
                f"{what}: {repo_filename[1]} of '{repo_filename[0]}' is not in the local Hugging Face cache "
                f"({type(exc).__name__}); run {_download_hint(*repo_filename)} as the path."
            ) from None
    expected = path / repo_filename[1] if (path.is_dir() and repo_filename) else path
    source = f" (from hub repo {repo_filename[0]})" if repo_filename else ""
    raise UserError(f"{what}: weights file not found at {expected}; place the file{source} there or pass its path.")


_HASH_CACHE: dict[tuple[str, int, float], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file, cached per (path, size, mtime) for the process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def identity_of(path: Path) -> str:
    """'path@version': a hub snapshot's commit, else the sha256 prefix of the (main) weights file."""
    path = path.resolve()
    if path.parent.name == "snapshots" or "snapshots" in path.parts:
        parts = path.parts
        i = parts.index("snapshots")
        return f"{parts[i - 1]}@{parts[i + 1][:12]}"
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return f"{path}@sha256:{file_sha256(path / name)[:12]}"
        return str(path)
    return f"{path}@sha256:{file_sha256(path)[:12]}"


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def load_pretrained(cls, folder: Path, what: str, fix: str = "pass a complete model directory"):
    """``cls.from_pretrained(folder)`` (a transformers class) from local files only; a failure is a UserError."""
    try:
        return cls.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise UserError(f"{what}: could not load {cls.__name__} from {folder} ({type(exc).__name__}: {first}); {fix}.") from None


def load_weights(module: torch.nn.Module, state: dict) -> tuple[list[str], list[str]]:
    """Non-strict load_state_dict -> (missing, unexpected) keys; the ``position_ids`` buffers that
    transformers builds itself (and checkpoints may omit) do not count as missing."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    return [k for k in missing if not k.endswith("position_ids")], list(unexpected)


# ---------------------------------------------------------------------------------------------
# preprocessing: two paths with one set of parameters.
# - exact (not differentiable): quantise to uint8 and resize with PIL bicubic, as the official
#   tools do on PNGs read from disk;
# - differentiable: torch bicubic with antialias (PIL-like Keys kernel a=-0.5), crop/pad, all
#   in torch so gradients reach the images.
# ---------------------------------------------------------------------------------------------


def _short_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    # torchvision Resize(int) / HF get_resize_output_image_size: long side truncated
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def _long_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    # open_clip ResizeMaxSize (HPSv2): scale = size / max(h, w), new = round(dim * scale)
    scale = size / max(h, w)
    return round(h * scale), round(w * scale)


def _crop_offsets(h: int, w: int, size: int) -> tuple[int, int]:
    # torchvision CenterCrop rounding
    return int(round((h - size) / 2.0)), int(round((w - size) / 2.0))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8, rounding as PNG writers do."""
    x = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _pil_resize(arr: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if arr.shape[:2] == hw:
        return arr
    return np.asarray(Image.fromarray(arr).resize((hw[1], hw[0]), resample=Image.BICUBIC))


def _torch_resize(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == hw:
        return x
    return F.interpolate(x, size=hw, mode="bicubic", align_corners=False, antialias=True)


def preprocess(
    images: torch.Tensor,
    size: int,
    mode: str,
    mean: Sequence[float],
    std: Sequence[float],
    differentiable: bool,
    crop: int | None = None,
) -> torch.Tensor:
    """images (B, 3, H, W) in [0, 1] -> normalised square float32 batch.

    mode "crop": shortest side to `size` (bicubic), centre crop `crop` (default `size`)
    (CLIP, PickScore, ImageReward). mode "pad": longest side to `size` (bicubic), zero-pad
    to a `size` square (HPSv2).
    """
    if mode not in ("crop", "pad"):
        raise ValueError(mode)
    b, c, h, w = images.shape
    new_hw = _short_side_size(h, w, size) if mode == "crop" else _long_side_size(h, w, size)
    if differentiable:
        x = _torch_resize(images.float(), new_hw)
    else:
        arrs = [_pil_resize(a, new_hw) for a in to_uint8(images)]
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float().div(255).to(images.device)
    nh, nw = new_hw
    if mode == "crop":
        crop = crop or size
        top, left = _crop_offsets(nh, nw, crop)
        x = x[:, :, top : top + crop, left : left + crop]
    else:
        ph, pw = size - nh, size - nw
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def check_inputs(images: torch.Tensor, prompts: Sequence[str]) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise UserError(f"scorer input must be images of shape (B, 3, H, W); got {tuple(images.shape)}.")
    if len(prompts) != images.shape[0]:
        raise UserError(f"scorer got {images.shape[0]} images but {len(prompts)} prompts; pass one prompt per image.")


class BatchedScorer:
    """Reward-protocol base: resident model, batched calls, grad only when differentiable.

    Subclasses set name / identity and implement ``_score(images, prompts)`` on one batch
    already on ``self.device`` (images float32 in [0, 1]); it returns (b,) scores. Their constructors
    take ``path``, their own options, and ``**common`` (the four parameters here), passed on unchanged.
    """

    name: str = ""
    identity: str = ""

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, batch_size: int = 16,
                 differentiable: bool = False):
        if batch_size < 1:
            raise UserError(f"scorer batch_size must be >= 1; got {batch_size}.")
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = int(batch_size)
        self.differentiable = bool(differentiable)

    def _freeze(self, *modules: torch.nn.Module) -> None:
        for m in modules:
            m.eval().requires_grad_(False).to(device=self.device, dtype=self.dtype)

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_inputs(images, prompts)
        prompts = list(prompts)
        out = []
        ctx = torch.enable_grad() if self.differentiable else torch.no_grad()
        with ctx:
            for i in range(0, images.shape[0], self.batch_size):
                x = images[i : i + self.batch_size].to(self.device, torch.float32)
                out.append(self._score(x, prompts[i : i + self.batch_size]).float())
        scores = torch.cat(out) if out else images.new_zeros(0)
        return scores.to(images.device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, identity={self.identity!r}, differentiable={self.differentiable})"


def scorer_options(klass: type[BatchedScorer]) -> set[str]:
    """A scorer class's keyword options: its constructor's named parameters and BatchedScorer's."""
    own = {n for n, p in inspect.signature(klass.__init__).parameters.items() if p.kind is not p.VAR_KEYWORD}
    return (own | set(inspect.signature(BatchedScorer.__init__).parameters)) - {"self"}
