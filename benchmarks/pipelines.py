"""Published diffusers text-to-image pipelines as evaluation models, beside this project's checkpoints.

    rtdmd-bench eval --pipeline stabilityai/stable-diffusion-3.5-large-turbo --steps 4 --guidance 1

Any pipeline ``DiffusionPipeline.from_pretrained`` loads from a local directory or from the local
Hugging Face cache (``local_files_only``: nothing is downloaded) runs with its own scheduler at the
user's steps and guidance, optionally with a LoRA (``load_lora_weights``) and scheduler options
(``type(scheduler).from_config(config, **kwargs)``). Image k of prompt i gets its own
``torch.Generator`` seeded as rtdmd.generate seeds that image's noise (``sample_seed(seed, i, k)``),
so a batch's composition never changes an image, as for checkpoints.

Suites score a pipeline's images in the real-image world: its ``backend`` is the project backend of
the pipeline's family (StableDiffusion3* -> sd3, Flux2* -> flux2) and sd3 for any other pipeline
(both real backends have the same scorers, detector and default prompts).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from benchmarks.eval_models import Model
from benchmarks.geneval import layout
from benchmarks.suites.base import BackendInfo
from rtdmd import registry
from rtdmd.checkpoint import sha256_file
from rtdmd.errors import UserError
from rtdmd.generate import SamplingConfig, sample_seed
from rtdmd.images import to_uint8
from rtdmd.seeding import torch_generator

#: pipeline class name prefix -> the project backend whose scorers / prompts its images get
FAMILY_BACKENDS = (("StableDiffusion3", "sd3"), ("Flux2", "flux2"))
DEFAULT_BATCH = 4  # images per pipeline call (eval / generate --batch-size overrides)
LORA_FILE = "pytorch_lora_weights.safetensors"


@dataclass
class PipelineSpec:
    """What the user named: the pipeline (hub id or directory), an optional LoRA, scheduler options."""

    ref: str
    lora: str | None = None
    lora_scale: float = 1.0  # the LoRA's strength, fused into the weights when not 1
    scheduler_kwargs: dict = field(default_factory=dict)
    resolution: int | None = None  # height = width; None: the pipeline's default
    batch_size: int = DEFAULT_BATCH
    hub_cache_dir: str = ""  # "" = huggingface_hub's default cache


def parse_scheduler_kwargs(text: str | None) -> dict:
    """--scheduler-kwargs: a JSON object (e.g. '{"shift": 3.0}')."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise UserError(f"--scheduler-kwargs is not valid JSON ({e}); pass an object such as '{{\"shift\": 3.0}}'.") from None
    if not isinstance(value, dict):
        raise UserError("--scheduler-kwargs must be a JSON object of scheduler options, e.g. '{\"shift\": 3.0}'.")
    return value


def locate(ref: str, hub_cache_dir: str = "") -> tuple[Path, str]:
    """(directory, identity): a local pipeline folder, or a hub id's snapshot in the local cache."""
    p = Path(ref).expanduser()
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise UserError(f"pipeline directory {p} has no model_index.json; pass a folder written by a diffusers "
                            "pipeline's save_pretrained (or 'hf download ID --local-dir DIR').")
        return p.resolve(), f"dir:{p.resolve()}"
    if ref.count("/") != 1 or ref.startswith((".", "/", "~")):
        raise UserError(f"--pipeline '{ref}' is neither an existing directory nor a hub id (owner/name); pass a "
                        "diffusers pipeline folder or the id of a model in the local Hugging Face cache.")
    from huggingface_hub import snapshot_download  # heavy, installed with diffusers; needed only for a hub id

    try:
        snap = Path(snapshot_download(ref, local_files_only=True, cache_dir=hub_cache_dir or None))
    except Exception:  # LocalEntryNotFoundError and friends: not in the cache
        raise UserError(f"pipeline '{ref}' is not in the local Hugging Face cache and nothing is downloaded here; "
                        f"fetch it on a machine with network access ('hf download {ref} --local-dir DIR'), copy DIR "
                        "here and pass --pipeline DIR.") from None
    return snap, f"hub:{ref}@{snap.name}"


def lora_path(path: str) -> Path:
    """The LoRA weights file: PATH itself (a .safetensors file) or PATH/pytorch_lora_weights.safetensors."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / LORA_FILE
    if not p.is_file() or p.suffix != ".safetensors":
        raise UserError(f"--lora {path} is not a .safetensors file or a folder holding {LORA_FILE}; pass the "
                        "LoRA that save_lora_weights (or rtdmd-bench export --format lora) wrote.")
    return p.resolve()


def _short(ref: str) -> str:
    return Path(ref.rstrip("/")).name or ref


def model_name(spec: PipelineSpec, lora_file: Path | None) -> str:
    """'pipeline:<name>[+lora:<name>][+scheduler:k=v,...]': the row's method name in MLflow and the report."""
    name = f"pipeline:{_short(spec.ref)}"
    if lora_file is not None:
        stem = lora_file.parent.name if lora_file.name == LORA_FILE else lora_file.stem
        name += f"+lora:{stem}" + (f"@{spec.lora_scale:g}" if spec.lora_scale != 1.0 else "")
    if spec.scheduler_kwargs:
        name += "+scheduler:" + ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(spec.scheduler_kwargs.items()))
    return name


def scoring_backend(pipeline_class: str) -> str:
    for prefix, backend in FAMILY_BACKENDS:
        if pipeline_class.startswith(prefix):
            return backend
    return "sd3"


@dataclass
class PipelineModel(Model):
    """A diffusers pipeline as an evaluation model (``checkpoint``: the pipeline's folder)."""

    spec: PipelineSpec | None = None
    identity: str = ""
    lora_file: Path | None = None

    @property
    def slug(self) -> str:
        safe = "".join(c if c.isalnum() or c in "-._" else "-" for c in self.method.split(":", 1)[1].split("+")[0])
        return f"pipeline-{safe}-{self.meta['model_sha256'][:8]}"

    def sampling(self, opts) -> SamplingConfig:
        """The pipeline's own scheduler at --steps / --guidance (``opts``: the runner's EvalOptions)."""
        return SamplingConfig(kind="pipeline", steps=opts.steps, guidance=opts.guidance, eta=0.0)


def check_pipeline_options(opts) -> None:
    """--pipeline takes --steps and --guidance and no --eta (the pipeline's scheduler has none of ours)."""
    if opts.steps is None or opts.guidance is None:
        raise UserError("--pipeline needs --steps and --guidance (its own scheduler runs at them); pass e.g. "
                        "--steps 4 --guidance 1.")
    if opts.eta is not None:
        raise UserError("--eta sets this project's CPS sampler; drop it with --pipeline (pass scheduler options "
                        "with --scheduler-kwargs).")


def describe_pipeline(spec: PipelineSpec) -> PipelineModel:
    """The pipeline's identity, name and scoring world, without loading any weights."""
    source, identity = locate(spec.ref, spec.hub_cache_dir)
    try:
        cls_name = str(json.loads((source / "model_index.json").read_text())["_class_name"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{source / 'model_index.json'} is unreadable or names no _class_name; re-download the "
                        "pipeline.") from None
    lora_file = lora_path(spec.lora) if spec.lora else None
    ident = {"pipeline": identity, "lora": sha256_file(lora_file) if lora_file else None, "lora_scale": spec.lora_scale,
             "scheduler_kwargs": spec.scheduler_kwargs, "resolution": spec.resolution}
    sha = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    backend = scoring_backend(cls_name)
    info = BackendInfo.from_options(backend, registry.get_backend(backend).options())
    tags = {"pipeline": spec.ref, "pipeline_class": cls_name, "pipeline_identity": identity,
            "lora": str(lora_file or ""), "lora_scale": f"{spec.lora_scale:g}", "scheduler_kwargs": json.dumps(spec.scheduler_kwargs, sort_keys=True)}
    return PipelineModel(source, model_name(spec, lora_file), info, {"model_sha256": sha, "pipeline": ident},
                         spec=spec, identity=identity, lora_file=lora_file, tags=tags)


# ---------------------------------------------------------------------------- loading


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:160]}" if text else type(exc).__name__


def _with_scheduler(pipe, kwargs: dict):
    sched = pipe.scheduler
    known = set(sched.config) | set(inspect.signature(type(sched).__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise UserError(f"--scheduler-kwargs: {type(sched).__name__} has no option {unknown[0]!r}; use keys of its "
                        f"config ({', '.join(sorted(k for k in sched.config if not k.startswith('_'))[:12])}, ...).")
    pipe.scheduler = type(sched).from_config(sched.config, **kwargs)


def _load_lora(pipe, path: Path, scale: float) -> None:
    if not hasattr(pipe, "load_lora_weights"):
        raise UserError(f"{type(pipe).__name__} cannot load LoRA weights (no load_lora_weights); drop --lora.")
    try:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)
        if scale != 1.0:
            pipe.fuse_lora(lora_scale=scale)
    except Exception as exc:  # noqa: BLE001 - diffusers raises many kinds for a LoRA that does not fit
        raise UserError(f"could not load LoRA {path} into {type(pipe).__name__} ({_first_line(exc)}); pass a LoRA "
                        "trained for this pipeline's model.") from None


def load_pipeline(model: PipelineModel, device: str, dtype: torch.dtype | None = None, progress: bool = True):
    """The pipeline on ``device`` (fp32 on CPU, bf16 on CUDA unless ``dtype``), scheduler options and LoRA applied."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    if not progress:
        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    try:
        pipe = DiffusionPipeline.from_pretrained(str(model.checkpoint), local_files_only=True, torch_dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - a missing or corrupt component, an unknown class
        raise UserError(f"could not load {model.checkpoint} as a diffusers pipeline ({_first_line(exc)}); "
                        f"re-download {model.spec.ref} or pass a complete pipeline folder.") from None
    params = inspect.signature(pipe.__call__).parameters
    if not {"prompt", "num_inference_steps", "generator"} <= set(params):
        raise UserError(f"{type(pipe).__name__} is not a text-to-image pipeline (its call takes no prompt, "
                        "num_inference_steps or generator); pass a text-to-image pipeline.")
    if model.spec.scheduler_kwargs:
        _with_scheduler(pipe, model.spec.scheduler_kwargs)
    if model.lora_file is not None:
        _load_lora(pipe, model.lora_file, model.spec.lora_scale)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# ---------------------------------------------------------------------------- generating


def _call_kwargs(pipe, prompts: list[str], keys: list[tuple], sc, resolution: int | None) -> dict:
    params = inspect.signature(pipe.__call__).parameters
    kw = {"prompt": prompts, "num_inference_steps": sc.steps, "output_type": "pt",
          "generator": [torch_generator(*k) for k in keys]}
    if "guidance_scale" in params:
        kw["guidance_scale"] = sc.guidance
    if resolution:
        kw["height"] = kw["width"] = resolution
    return kw


def pipeline_images(pipe, prompts: list[str], keys: list[tuple], sc, resolution: int | None = None) -> torch.Tensor:
    """One call: (B, 3, H, W) float images in [0, 1]; a non-finite image is a UserError."""
    with torch.no_grad():
        images = pipe(**_call_kwargs(pipe, prompts, keys, sc, resolution)).images
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise UserError(f"{type(pipe).__name__} returned no image tensor for output_type='pt'; pass a text-to-image "
                        "pipeline.")
    if images.shape[-1] == 3 and images.shape[1] != 3:
        images = images.permute(0, 3, 1, 2)
    if not torch.isfinite(images).all():
        raise UserError(f"{type(pipe).__name__} produced non-finite pixels; try another --pipeline dtype / device "
                        "or fewer scheduler changes.")
    return images.float()


def generate_images(model: PipelineModel, metadata: Sequence[dict], out: Path, sc, seed: int,
                    todo: Sequence[tuple[int, int]], device: str, cache: dict, progress: bool = True) -> int:
    """Write the (prompt index, image number) images of ``todo`` into ``out`` (GenEval layout); returns how many."""
    if "pipe" not in cache:
        cache["pipe"] = load_pipeline(model, device, progress=progress)
    pipe = cache["pipe"]
    bs = max(1, model.spec.batch_size)
    bar = tqdm(total=len(todo), desc="generate", unit="img", dynamic_ncols=True) if progress and todo else None
    for start in range(0, len(todo), bs):
        chunk = list(todo[start:start + bs])
        images = pipeline_images(pipe, [metadata[i]["prompt"] for i, _ in chunk],
                                 [sample_seed(seed, i, k) for i, k in chunk], sc, model.spec.resolution)
        for (i, k), arr in zip(chunk, to_uint8(images)):
            layout.save_image(out, i, k, arr)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return len(todo)
