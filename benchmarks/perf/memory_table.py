#!/usr/bin/env python
"""Estimated peak GPU memory per device for every real backend x method, and what makes it fit 80 GB.

Resident memory is counted exactly from the published configs (networks built on the meta
device; benchmarks/perf/real_model_configs.py). Activation memory follows this model:

    A grad-carrying transformer forward of one sample saves T * (L * c + e) bytes without
    gradient checkpointing, where T is the sequence length (image + text tokens), L the number
    of blocks, c the bytes one block saves per token and e the per-token bytes outside the
    blocks. With checkpointing it keeps each block's inputs, T * d * 2 bytes per block (bf16),
    plus one block's saved tensors while that block is recomputed: T * (L * 2d + c + e).

c and e are MEASURED here, on CPU, by counting the bytes autograd saves (saved-tensor hooks,
each storage once, parameters excluded) in the real diffusers block classes at the real
width, with a rank-32 LoRA active on the attention projections (fp32 adapters on a bf16 base,
as the backends run), at two depths and two token counts (fit linear in L and T; flash
attention on GPU saves nothing quadratic in T, and the CPU kernel used here does not either).
The VAE decoder (with grad, for reward back-propagation; with checkpointing: each decoder
block's input kept plus the largest block's saved tensors) and a CLIP ViT reward tower are
measured the same way. Per method, what is alive at the peak is COUNTED from the method's own
code (benchmarks/perf/method_driver.py): its shipped config trains on tiny random networks of
the real classes through the Trainer's own steps, covering one update period (every Hyper-SD
stage), and each update's loss is counted for grad-carrying transformer forwards, VAE decodes with
grad and reward towers back-propagated, per sample; the largest update sets the peak. Networks
with an optimiser and EMA copies are counted from the same run; the scorers the config names
are resident at their towers' sizes.
Not modelled: allocator fragmentation (typically 5-15% more), CUDA context (~0.5 GB), the
transient working set of no-grad forwards (under one block's activations per sample).

    python benchmarks/perf/memory_table.py [--batch 9] [--gpu-gb 80] [--json out.json]

Needs torch, diffusers, transformers, peft; not MLflow.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import method_driver as D  # noqa: E402
import real_model_configs as RC  # noqa: E402
from rtdmd.api import make_config  # noqa: E402
from rtdmd.backends import lora as L  # noqa: E402
from rtdmd.backends.flux2 import flux2_velocity  # noqa: E402
from rtdmd.backends.lora import FLUX2_ATTENTION_TARGETS, SD3_ATTENTION_TARGETS  # noqa: E402

GB = 1e9
BF16, FP32 = 2, 4
ADAM_TRAINED = FP32 * 4  # fp32 weight + fp32 grad + two fp32 Adam moments, bytes per trained parameter


# ---------------------------------------------------------------------------- measurement
def saved_activation_bytes(fn, exclude: set[int]) -> int:
    """Bytes autograd saves while ``fn`` runs: each storage once, storages in ``exclude`` (parameters) skipped."""
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def fit_linear(points: list[tuple[float, float, float]]) -> tuple[float, float]:
    """Least squares of bytes = L * T * c + T * e over (L, T, bytes) points -> (c, e)."""
    a = torch.tensor([[L * T, T] for L, T, _ in points], dtype=torch.float64)
    y = torch.tensor([b for _, _, b in points], dtype=torch.float64)
    sol = torch.linalg.lstsq(a, y.unsqueeze(1)).solution.squeeze(1)
    return float(sol[0]), float(sol[1])


def _build(factory):
    """Build a network with bf16 weights on CPU (random init; buffers such as position ids intact)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        return factory().requires_grad_(False)
    finally:
        torch.set_default_dtype(old)


def _with_lora(model, targets):
    L.add_adapter(model, "g", L.LoraSpec(rank=32, alpha=64, targets=targets))
    L.set_state(model, (False, ("g",)))
    return model


def _param_ptrs(model) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


def measure_sd3(variant: str, sides=(8, 16), text_tokens: int = 32) -> dict:
    """c, e (bytes per token) of the SD3 transformer family with LoRA r32, from L in {1, 2} and two image sizes."""
    from diffusers import SD3Transformer2DModel


    cfg = dict(RC.SD3_TRANSFORMERS[variant])
    pts = []
    for n in (1, 2):
        c = dict(cfg, num_layers=n, dual_attention_layers=tuple(range(n)) if cfg.get("dual_attention_layers") else ())
        m = _with_lora(_build(lambda: SD3Transformer2DModel(**c)), SD3_ATTENTION_TARGETS)
        for side in sides:
            x = torch.randn(1, cfg["in_channels"], side, side, dtype=torch.bfloat16)
            txt = torch.randn(1, text_tokens, cfg["joint_attention_dim"], dtype=torch.bfloat16)
            pooled = torch.randn(1, cfg["pooled_projection_dim"], dtype=torch.bfloat16)
            tokens = (side // cfg["patch_size"]) ** 2 + text_tokens
            b = saved_activation_bytes(lambda: m(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=txt,
                                                 pooled_projections=pooled), _param_ptrs(m))
            pts.append((n, tokens, b))
    c, e = fit_linear(pts)
    return {"c": c, "e": e, "width": cfg["num_attention_heads"] * cfg["attention_head_dim"], "points": pts}


def measure_flux2(variant: str, sides=(8, 16), text_tokens: int = 32) -> dict:
    """Per-token bytes of FLUX.2 double blocks (c2), single blocks (c1) and the rest (e), with LoRA r32."""
    from diffusers import Flux2Transformer2DModel


    cfg = dict(RC.FLUX2_TRANSFORMERS[variant])
    rows = []
    for nd, ns in ((1, 1), (2, 1), (1, 2)):
        m = _with_lora(_build(lambda: Flux2Transformer2DModel(**dict(cfg, num_layers=nd, num_single_layers=ns))),
                       FLUX2_ATTENTION_TARGETS)
        for side in sides:
            x = torch.randn(1, cfg["in_channels"], side, side)
            cond = {"prompt_embeds": torch.randn(1, text_tokens, cfg["joint_attention_dim"], dtype=torch.bfloat16)}
            b = saved_activation_bytes(lambda: flux2_velocity(m, x, torch.tensor([0.5]), cond), _param_ptrs(m))
            rows.append((nd, ns, side * side + text_tokens, b))
    a = torch.tensor([[nd * T, ns * T, T] for nd, ns, T, _ in rows], dtype=torch.float64)
    y = torch.tensor([[b] for *_, b in rows], dtype=torch.float64)
    c2, c1, e = (float(v) for v in torch.linalg.lstsq(a, y).solution.squeeze(1))
    return {"c_double": c2, "c_single": c1, "e": e, "width": cfg["num_attention_heads"] * cfg["attention_head_dim"]}


def measure_vae_decoder(kind: str, sides=(8, 16)) -> dict:
    """Bytes saved per output pixel by a VAE decode with grad (real channel widths), without and with
    diffusers' decoder checkpointing (mid block and each up block checkpointed: their inputs stay,
    plus the largest block's saved tensors during its recompute, plus the unchecked input / output layers)."""
    from diffusers import AutoencoderKL, AutoencoderKLFlux2

    cls, cfg = (AutoencoderKL, RC.SD3_VAE) if kind == "sd3" else (AutoencoderKLFlux2, RC.FLUX2_VAE)
    vae = _build(lambda: cls(**cfg))
    dec = vae.decoder
    blocks = [dec.mid_block, *dec.up_blocks]
    ch = cfg["latent_channels"]
    f = 2 ** (len(cfg["block_out_channels"]) - 1)
    plain, ckpt = [], []
    for side in sides:
        z = torch.randn(1, ch, side, side, dtype=torch.bfloat16, requires_grad=True)
        pts = _param_ptrs(vae)
        total = saved_activation_bytes(lambda: vae.decode(z).sample, pts)
        plain.append((1, (side * f) ** 2, total))
        inputs = []
        hooks = [b.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach())) for b in blocks]
        with torch.no_grad():
            vae.decode(z)
        for h in hooks:
            h.remove()
        per_block = [saved_activation_bytes(lambda: b(x.requires_grad_(True), None), pts) for b, x in zip(blocks, inputs)]
        kept = sum(x.numel() * x.element_size() for x in inputs)
        # conv_in and the full-resolution output head are not checkpointed: they keep what they saved
        ckpt.append((1, (side * f) ** 2, kept + max(per_block) + total - sum(per_block)))
    c, e = fit_linear(plain)
    c2, e2 = fit_linear(ckpt)
    return {"plain": c + e, "ckpt": c2 + e2}


def measure_vit(cfg: dict, layers=(1, 2)) -> dict:
    """Bytes saved per image by a CLIP ViT image tower with grad (back-propagated rewards), full depth."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    pts = []
    for n in layers:
        m = _build(lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**dict(cfg, num_hidden_layers=n))))
        px = torch.randn(1, 3, cfg["image_size"], cfg["image_size"], dtype=torch.bfloat16, requires_grad=True)
        pts.append((n, 1, saved_activation_bytes(lambda: m(pixel_values=px).image_embeds, _param_ptrs(m))))
    c, e = fit_linear(pts)
    return {"per_image": c * cfg["num_hidden_layers"] + e}


def count_params(kind: str, variant: str) -> dict:
    """Parameters of the transformer, its LoRA r32 adapter, the VAE and the text encoders (meta device)."""
    from diffusers import AutoencoderKL, AutoencoderKLFlux2, Flux2Transformer2DModel, SD3Transformer2DModel
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, Qwen3Config, Qwen3ForCausalLM, T5Config,
                              T5EncoderModel)


    with torch.device("meta"):
        if kind == "sd3":
            tr, vae = SD3Transformer2DModel(**RC.SD3_TRANSFORMERS[variant]), AutoencoderKL(**RC.SD3_VAE)
            texts = []
            for name, c in RC.SD3_TEXT.items():
                c = {k: v for k, v in c.items() if k != "kind"}
                texts.append(CLIPTextModelWithProjection(CLIPTextConfig(**c)) if name.startswith("clip") else T5EncoderModel(T5Config(**c)))
            targets = L.SD3_ATTENTION_TARGETS
        else:
            tr, vae = Flux2Transformer2DModel(**RC.FLUX2_TRANSFORMERS[variant]), AutoencoderKLFlux2(**RC.FLUX2_VAE)
            c = {k: v for k, v in RC.FLUX2_TEXT[variant].items() if k != "kind"}
            texts = [Qwen3ForCausalLM(Qwen3Config(**c))]
            targets = L.FLUX2_ATTENTION_TARGETS
        lora = sum(32 * (m.in_features + m.out_features) for m in (tr.get_submodule(n) for n in L.target_module_names(tr, targets)))
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"transformer": n(tr), "lora": lora, "vae": n(vae), "text": sum(n(t) for t in texts)}


# ---------------------------------------------------------------------------- what each method keeps alive
@dataclass
class UpdateProfile:
    """One optimiser update's loss graph, alive until its backward: per sample of the batch."""

    grad_forwards: float  # grad-carrying transformer forwards
    decodes: float  # VAE decodes with grad (reward back-propagation)
    reward_towers: dict[str, float]  # image tower kind -> images back-propagated through it


@dataclass
class MethodProfile:
    """What one method keeps on a GPU, counted from a run of its own code (measured_profiles)."""

    trained: int  # networks with an optimiser (adapters or full copies), each with AdamW state
    frozen_adapters: int  # EMA copies (no optimiser)
    updates: list[UpdateProfile]  # every update seen; the peak is the largest
    rewards_resident: float  # reward model parameters kept on the GPU (bf16)
    note: str


REWARD_TOWER_PARAMS = {"vit_h": 0.986e9, "vit_l": 0.428e9}  # CLIP ViT-H/14, ViT-L/14 (with their text towers)
PROFILE_METHODS = ["dmd2", "ac-dmd", "rtdmd", "flow-grpo", "lcm", "hypersd"]


def profile_steps(method) -> list[int]:
    """Steps that cover every kind of iteration: one update period, or the start of every Hyper-SD stage."""
    if hasattr(method, "plan"):
        return sorted({st.start for st in method.plan})
    return list(range(D.update_period(method)))


def _profile_run(tr, towers: dict, batch: int) -> list[UpdateProfile]:
    """Count, per update, the grad-carrying calls its loss makes (the trainer's own steps)."""
    counter = D.CallCounter(tr)
    method = tr.method
    inner = method.loss
    seen: list[UpdateProfile] = []

    def loss(network, ctx):
        counter.counts.clear()
        before = {n: t.calls.get("grad", 0) for n, t in towers.items()}
        out = inner(network, ctx)
        grad = sum(v for k, v in counter.counts.items() if k.endswith("_grad") and not k.startswith("decode"))
        rewards: dict[str, float] = {}
        for n, t in towers.items():
            k = D.REWARD_STANDINS[n][0]
            rewards[k] = rewards.get(k, 0.0) + (t.calls.get("grad", 0) - before[n]) / batch
        seen.append(UpdateProfile(grad / batch, counter.counts.get("decode_grad", 0) / batch,
                                  {k: v for k, v in rewards.items() if v}))
        return out

    method.loss = loss
    try:
        for step in profile_steps(method):
            D.trainer_step(tr, step)
    finally:
        del method.loss
        counter.close()
    return seen


def measured_profiles(kind: str, methods=PROFILE_METHODS) -> dict[str, MethodProfile]:
    """Run every method's shipped ``kind`` config on tiny random networks of the real classes (CPU) and
    count what its updates keep alive; rtdmd stage 2 starts from the ac-dmd run's checkpoint."""

    out: dict[str, MethodProfile] = {}
    batch = 2
    init = None
    order = sorted(methods, key=lambda m: m != "ac-dmd")  # stage 2 needs the stage-1 checkpoint
    with D.temp_dir() as tmp, D.random_real_backends(tiny=True):
        pfile = D.prompts_file(Path(tmp))
        for m in order:
            over = D.real_overrides(kind, True, pfile, "cpu")
            if m == "rtdmd":
                if init is None:
                    raise RuntimeError("profiling rtdmd stage 2 needs ac-dmd profiled first")
                over["method"] = {"stage": 2, "init": str(init)}
            cfg = make_config(m, backend=kind, overrides=over)
            cfg.train.batch_size = batch
            if hasattr(cfg.method, "group_size"):
                cfg.method.group_size = batch
            names = D.use_standins(cfg)
            with D.standin_rewards(names, True, "cpu", torch.float32) as towers:
                tr = D.setup_trainer(cfg, Path(tmp) / m)
                try:
                    updates = _profile_run(tr, towers, batch)
                    if m == "ac-dmd":
                        init = D.save_checkpoint(tr, 1)
                    trained = len(tr.optimizers)
                    emas = len(tr.emas)
                finally:
                    D.release(tr)
            resident = sum(REWARD_TOWER_PARAMS[D.REWARD_STANDINS[n][0]] for n in names)
            out[m] = MethodProfile(trained, emas, updates, resident, f"rewards: {', '.join(names) or 'none'}")
    return {m: out[m] for m in methods}


# ---------------------------------------------------------------------------- the estimate
VARIANTS = [("sd3", "sd3-medium", 1024), ("sd3", "sd3.5-medium", 1024), ("sd3", "sd3.5-large", 1024),
            ("flux2", "klein-base-4b", 512), ("flux2", "klein-base-9b", 512)]


def tokens_of(kind: str, resolution: int) -> tuple[int, int]:
    """(image tokens, text tokens) of one sample."""
    if kind == "sd3":
        return (resolution // 16) ** 2, RC.SD3_TOKENS  # 8x VAE, 2x2 patches
    return (resolution // 16) ** 2, RC.FLUX2_TOKENS  # 8x VAE, 2x2 patchify, 1x1 patches


def transformer_activation_bytes(per_token: dict, blocks: list[tuple[str, int]], tokens: int, width: int,
                                 checkpointing: bool) -> float:
    """One sample's grad-carrying forward: T (sum_b L_b c_b + e), or with checkpointing T (L 2d + max c_b + e)."""
    if not checkpointing:
        return tokens * (sum(per_token[k] * n for k, n in blocks) + per_token["e"])
    n_blocks = sum(n for _, n in blocks)
    return tokens * (n_blocks * BF16 * width + max(per_token[k] for k, _ in blocks) + per_token["e"])


def update_bytes(u: UpdateProfile, act: dict, checkpointing: bool) -> float:
    """Activation bytes per sample of one update's loss graph."""
    b = u.grad_forwards * act["transformer_ckpt" if checkpointing else "transformer"]
    b += u.decodes * act["vae_ckpt" if checkpointing else "vae"]
    return b + sum(n * act[t] for t, n in u.reward_towers.items())


def estimate(params: dict, act: dict, prof: MethodProfile, batch: int, checkpointing: bool, full: bool = False) -> dict:
    """Peak bytes per GPU: resident weights and optimiser state + batch x activations of the largest update."""
    p_t = params["transformer"]
    trained = prof.trained * (p_t if full else params["lora"]) * ADAM_TRAINED
    frozen = prof.frozen_adapters * (p_t if full else params["lora"]) * FP32
    resident = p_t * BF16 + trained + frozen + params["vae"] * BF16 + prof.rewards_resident * BF16
    per_sample = max(update_bytes(u, act, checkpointing) for u in prof.updates)
    return {"resident": resident, "per_sample": per_sample, "peak": resident + batch * per_sample}


def build_table(batch: int, gpu_gb: float) -> dict:
    vit = {"vit_h": measure_vit(RC.VIT_H14)["per_image"], "vit_l": measure_vit(RC.VIT_L14)["per_image"]}
    vae = {k: measure_vae_decoder(k) for k in ("sd3", "flux2")}
    profiles = {k: measured_profiles(k) for k in ("sd3", "flux2")}
    rows = []
    for kind, variant, res in VARIANTS:
        params = count_params(kind, variant)
        img, txt = tokens_of(kind, res)
        if kind == "sd3":
            m = measure_sd3(variant)
            per_token, blocks = {"joint": m["c"], "e": m["e"]}, [("joint", RC.SD3_TRANSFORMERS[variant]["num_layers"])]
        else:
            m = measure_flux2(variant)
            cfg = RC.FLUX2_TRANSFORMERS[variant]
            per_token = {"double": m["c_double"], "single": m["c_single"], "e": m["e"]}
            blocks = [("double", cfg["num_layers"]), ("single", cfg["num_single_layers"])]
        act = {"transformer": transformer_activation_bytes(per_token, blocks, img + txt, m["width"], False),
               "transformer_ckpt": transformer_activation_bytes(per_token, blocks, img + txt, m["width"], True),
               "vae": vae[kind]["plain"] * res * res, "vae_ckpt": vae[kind]["ckpt"] * res * res, **vit}
        for method, prof in profiles[kind].items():
            plain = estimate(params, act, prof, batch, False)
            ckpt = estimate(params, act, prof, batch, True)
            full = estimate(params, act, prof, batch, True, full=True)
            budget = gpu_gb * GB
            if plain["peak"] <= budget:
                fits = "as is"
            elif ckpt["peak"] <= budget:
                fits = "gradient checkpointing"
            else:
                nmax = int((budget - ckpt["resident"]) // ckpt["per_sample"])
                fits = f"checkpointing + batch <= {nmax}/GPU" if nmax > 0 else "does not fit"
            rows.append({"backend": kind, "variant": variant, "resolution": res, "method": method,
                         "resident_gb": ckpt["resident"] / GB, "act_per_sample_gb": plain["per_sample"] / GB,
                         "act_per_sample_ckpt_gb": ckpt["per_sample"] / GB, "peak_gb": plain["peak"] / GB,
                         "peak_ckpt_gb": ckpt["peak"] / GB, "peak_full_ckpt_gb": full["peak"] / GB, "fits": fits})
    return {"batch": batch, "gpu_gb": gpu_gb, "vae_bytes_per_pixel": vae, "reward_tower_bytes_per_image": vit,
            "profiles": {k: {m: asdict(p) for m, p in v.items()} for k, v in profiles.items()}, "rows": rows}


def markdown(table: dict) -> str:
    b, g = table["batch"], table["gpu_gb"]
    out = [f"| backend / variant | method | resident GB | act/sample GB (ckpt) | peak b={b} GB | peak b={b} ckpt GB "
           f"| full FT ckpt GB | fits {g:.0f} GB with |", "|---|---|---|---|---|---|---|---|"]
    for r in table["rows"]:
        out.append(f"| {r['variant']} @{r['resolution']} | {r['method']} | {r['resident_gb']:.1f} | "
                   f"{r['act_per_sample_gb']:.1f} ({r['act_per_sample_ckpt_gb']:.2f}) | {r['peak_gb']:.0f} | "
                   f"{r['peak_ckpt_gb']:.0f} | {r['peak_full_ckpt_gb']:.0f} | {r['fits']} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=9, help="samples per GPU (docs/paper.md: 9/GPU x 8 GPUs)")
    ap.add_argument("--gpu-gb", type=float, default=80.0)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    torch.set_grad_enabled(True)
    table = build_table(a.batch, a.gpu_gb)
    if a.json:
        a.json.write_text(json.dumps(table, indent=1))
    print(markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
