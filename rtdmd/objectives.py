"""Pure loss functions and the small random draws they need; one function per idea.

Sources: docs/paper.md (RTDMD: AC-DMD section 3, RTDMD / SubGRPO section 4) and docs/paper.md s6
(DMD2, LCM flow port, ReFL, Flow-GRPO). All v / x0 / eps conversions come from rtdmd.flow.
Random draws take an explicit torch.Generator (drawn on its device, moved to the data's).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from rtdmd.errors import UserError
from rtdmd.seeding import derive_seed
from rtdmd.flow import SigmaLike, expand_sigma, flow_matching_target, sampling_sigmas


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1) if x.dim() > 1 else x


def _rand(shape, generator: torch.Generator | None, like: torch.Tensor | None = None) -> torch.Tensor:
    dev = generator.device if generator is not None else "cpu"
    u = torch.rand(shape, generator=generator, device=dev, dtype=torch.float64)
    return u.to(device=like.device, dtype=like.dtype) if like is not None else u.float()


# ---------------------------------------------------------------------------- DMD (DMD2, AC-DMD)
def dmd_gradient(x: torch.Tensor, x_real: torch.Tensor, x_fake: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """DMD gradient g = (x_fake - x_real) / mean_{C,H,W} |x - x_real| per sample, in float64.

    docs/paper.md s6.1 / docs/paper.md s3 step 6 (x_real, x_fake: teacher / fake predictions of the
    clean, or for AC-DMD the s-level, state). nan_to_num guards x == x_real (as the DMD2 code).
    normalize=False returns the raw x_fake - x_real.
    """
    x, x_real, x_fake = (t.detach().to(torch.float64) for t in (x, x_real, x_fake))
    g = x_fake - x_real
    if normalize:
        denom = (x - x_real).abs().flatten(1).mean(dim=1)
        g = g / denom.reshape(-1, *([1] * (x.dim() - 1)))
    return torch.nan_to_num(g)


def dmd_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """L = 0.5 * mean((x - stopgrad(x - g))^2), a float64 scalar whose gradient w.r.t. x is g / numel.

    Mean over all elements (not a sum) as in the DMD2 code (F.mse_loss, reduction "mean"), so the
    published learning rates apply; float64 as docs/paper.md s0 asks.
    """
    x64 = x.to(torch.float64)
    target = (x64 - grad.to(torch.float64)).detach()
    return 0.5 * ((x64 - target) ** 2).mean()


# ---------------------------------------------------------------------------- score matching
def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """mean_b [ w_b * mean_{dims} (pred - target)^2 ]; weight None means 1 (plain MSE)."""
    per = _per_sample_mean((pred.float() - target.float()) ** 2)
    if weight is not None:
        per = per * weight.to(per.dtype).reshape(per.shape)
    return per.mean()


def flow_matching_loss(
    v_pred: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Flow matching ||v - (eps - x0)||^2, mean over elements, optional per-sample weight (docs/paper.md s6.1)."""
    return weighted_mse(v_pred, flow_matching_target(x0, eps), weight)


def sample_subinterval_t(
    s: SigmaLike,
    generator: torch.Generator | None,
    lo: float = 0.02,
    hi: float = 0.98,
    margin: float = 0.01,
    n: int | None = None,
) -> torch.Tensor:
    """t ~ U[s + margin, 1] clamped to [lo, hi] (docs/paper.md s3 step 4). s: (B,) tensor, or float with n."""
    if torch.is_tensor(s):
        s_t = s.float() if not s.is_floating_point() else s
    else:
        s_t = torch.full((n,) if n is not None else (), float(s))
    u = _rand(s_t.shape, generator, like=s_t)
    t = s_t + margin + (1 - s_t - margin) * u
    return t.clamp(lo, hi)


def _subinterval_coeffs(s: SigmaLike, t: SigmaLike) -> tuple[torch.Tensor, torch.Tensor]:
    # docs/paper.md s3 step 4: x_t = a x_s + sigma_ts n makes x_t = (1-t) x0 + t eps' exactly,
    # since a (1 - s) = 1 - t and a^2 s^2 + sigma_ts^2 = t^2.
    s, t = torch.as_tensor(s), torch.as_tensor(t)
    if bool((s >= 1).any()):
        raise ValueError("re-noising needs s < 1")
    a = (1 - t) / (1 - s)
    sigma_ts = torch.sqrt(torch.clamp(t**2 - a**2 * s**2, min=0.0))
    return a, sigma_ts


def renoise_subinterval(
    x_s: torch.Tensor, s: SigmaLike, t: SigmaLike, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward re-noising s -> t (docs/paper.md s3 step 4): a = (1-t)/(1-s), sigma_ts = sqrt(t^2 - a^2 s^2),
    x_t = a x_s + sigma_ts n. Returns (x_t, a, sigma_ts) with a, sigma_ts shaped like s / t."""
    a, sigma_ts = _subinterval_coeffs(s, t)
    x_t = expand_sigma(a, x_s) * x_s + expand_sigma(sigma_ts, x_s) * noise
    return x_t, a, sigma_ts


def ambient_dsm_target(x_s: torch.Tensor, s: SigmaLike, t: SigmaLike, noise: torch.Tensor) -> torch.Tensor:
    """Ambient DSM target v* = -x_s/(1-s) + ((t + (1-t) s^2/(1-s)^2) / sigma_ts) n (docs/paper.md s3).

    Why: the score of p_t is -E[n | x_t]/sigma_ts = -E[eps' | x_t]/t, and E[v | x_t] =
    (E[eps'|x_t] - x_t)/(1-t); substituting x_t = a x_s + sigma_ts n gives v*, so
    E[v* | x_t] is the clean-data velocity. For s = 0: v* = n - x0.
    """
    _, sigma_ts = _subinterval_coeffs(s, t)
    s_, t_ = torch.as_tensor(s), torch.as_tensor(t)
    coef = (t_ + (1 - t_) * s_**2 / (1 - s_) ** 2) / sigma_ts
    return -x_s / (1 - expand_sigma(s_, x_s)) + expand_sigma(coef, x_s) * noise


def ambient_weight(sigma_ts: torch.Tensor, clamp: float = 10.0) -> torch.Tensor:
    """ADSM loss weight min(1, clamp * sigma_ts^2) (docs/paper.md s3, clamp 10 from the code)."""
    return torch.clamp(clamp * torch.as_tensor(sigma_ts) ** 2, max=1.0)


def ambient_dsm_loss(
    v_pred: torch.Tensor, x_s: torch.Tensor, s: SigmaLike, t: SigmaLike, noise: torch.Tensor, clamp: float = 10.0
) -> torch.Tensor:
    """L_ADSM = mean_b min(1, clamp sigma_ts^2) * mean (v_phi(x_t, t) - v*)^2 (docs/paper.md s3)."""
    _, sigma_ts = _subinterval_coeffs(s, t)
    w = ambient_weight(sigma_ts, clamp)
    if w.dim() == 0:
        w = w.expand(x_s.shape[0])
    return weighted_mse(v_pred, ambient_dsm_target(x_s, s, t, noise).detach(), w)


def sample_consistency_t(t: torch.Tensor, generator: torch.Generator | None, max_delta: int = 200) -> torch.Tensor:
    """t' = max(t - delta/1000, 0), delta ~ UniformInt{1..max_delta} (docs/paper.md s3, consistency step 2)."""
    dev = generator.device if generator is not None else "cpu"
    delta = torch.randint(1, max_delta + 1, t.shape, generator=generator, device=dev).to(device=t.device, dtype=t.dtype)
    return torch.clamp(t - delta / 1000.0, min=0.0)


def consistency_regulariser(h1: torch.Tensor, h2: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """mean((h1 - anchor) * (h2 - anchor)) (docs/paper.md s3): with h1, h2 independent given the anchor this is
    an unbiased estimate of ||E h - anchor||^2 (a single squared sample would add Var h)."""
    return ((h1 - anchor) * (h2 - anchor)).mean()


# ---------------------------------------------------------------------------- LCM / phased consistency
def pseudo_huber(d: torch.Tensor, c: float = 0.001, reduction: str = "mean") -> torch.Tensor:
    """Pseudo-Huber sqrt(d^2 + c^2) - c, ELEMENTWISE then averaged (docs/paper.md s6.2).

    The LCM and PCM training scripts apply it to each element and take torch.mean over
    everything ("mean"); "per_sample" returns the (B,) means, "none" the elementwise values.
    """
    val = torch.sqrt(d.float() ** 2 + c**2) - c
    if reduction == "mean":
        return val.mean()
    if reduction == "per_sample":
        return _per_sample_mean(val)
    if reduction == "none":
        return val
    raise ValueError(f"unknown reduction {reduction!r}")


def lcm_boundary_coefficients(t: SigmaLike, sigma_data: float = 0.5, scale: float = 10.0):
    """LCM boundary (c_skip, c_out) at model timestep t (0..1000): c_skip = sd^2/((scale t)^2 + sd^2),
    c_out = scale t / sqrt((scale t)^2 + sd^2) (docs/paper.md s6.2), so f = x at t = 0."""
    st = scale * t
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / (st**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def phase_edges(num_phases: int, shift: float = 1.0) -> torch.Tensor:
    """(num_phases + 1,) descending edges splitting [0, 1] into equal segments (then shifted); docs/paper.md s6.2."""
    if int(num_phases) < 1:
        raise UserError(f"phases must be at least 1 (got {num_phases}); use 1, 2 or 4.")
    return sampling_sigmas(int(num_phases), shift)


def phase_lower_edge(sigma: SigmaLike, edges: torch.Tensor) -> SigmaLike:
    """The largest edge strictly below sigma (segments are (lower, upper]); 0 for sigma <= the lowest edge."""
    e = torch.sort(torch.as_tensor(edges, dtype=torch.float64)).values
    s = torch.as_tensor(sigma, dtype=torch.float64)
    idx = torch.clamp(torch.searchsorted(e, s.to(e.device), right=False) - 1, min=0)
    out = e[idx]
    if torch.is_tensor(sigma):
        return out.to(device=sigma.device, dtype=sigma.dtype if sigma.is_floating_point() else torch.float32)
    return float(out)


def euler_jump(x: torch.Tensor, v: torch.Tensor, s: SigmaLike, s_to: SigmaLike) -> torch.Tensor:
    """x + (s_to - s) v: a flow state moved from sigma s to s_to along velocity v (docs/paper.md s6.2 flow port:
    the student's jump to its phase edge, the teacher's solver step and the target's jump all take this form)."""
    return x + (expand_sigma(s_to, x) - expand_sigma(s, x)) * v


def phased_solver_grid(sigmas, edges, tol: float = 1e-6) -> torch.Tensor:
    """Descending float64 union of the teacher's solver sigmas and the phase edges, a sigma within ``tol`` of an
    edge replaced by the edge, so that no solver step crosses a phase edge (docs/paper.md s6.2 flow port)."""
    e = [float(v) for v in torch.as_tensor(edges, dtype=torch.float64).flatten()]
    pts = list(e)
    for v in torch.as_tensor(sigmas, dtype=torch.float64).flatten().tolist():
        if all(abs(v - p) > tol for p in pts):
            pts.append(v)
    return torch.tensor(sorted(pts, reverse=True), dtype=torch.float64)


# ---------------------------------------------------------------------------- reward terms
def refl_hinge(reward: torch.Tensor, margin: float) -> torch.Tensor:
    """relu(margin - reward), elementwise (docs/paper.md s6.4; docs/paper.md s4 L_BP with margin 3)."""
    return F.relu(margin - reward)


def group_advantages(
    rewards: Mapping[str, torch.Tensor],
    group_ids: torch.Tensor,
    clip: float = 5.0,
    eps: float = 1e-4,
    weights: Mapping[str, float] | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    """Multi-reward group advantages (docs/paper.md s4), (N,) float32.

    A_j = (r_j - mean over the prompt's group) / (std over the whole batch + eps); A = sum_j w_j A_j;
    with more than one reward A is re-standardised globally, (A - mean) / (std + eps); clip to +-clip.
    With one reward (weight 1) this is exactly Flow-GRPO's advantage (docs/paper.md s6). std is the
    population std (ddof 0, numpy's default as in Flow-GRPO).
    normalize=False: A = sum_j w_j (r_j - group mean), no std division and no re-standardisation, so
    the policy gradient estimates grad E[sum_j w_j r_j] itself (the exact tilted-KL check, docs/rtdmd.md).
    """
    if not rewards:
        raise ValueError("group_advantages needs at least one reward")
    gid = torch.as_tensor(group_ids).reshape(-1)
    _, inv = torch.unique(gid, return_inverse=True)
    n_groups = int(inv.max()) + 1
    total = None
    for name, r in rewards.items():
        r = torch.as_tensor(r).detach().to(torch.float64).reshape(-1).cpu()
        if r.shape[0] != gid.shape[0]:
            raise ValueError(f"reward {name!r} has {r.shape[0]} values for {gid.shape[0]} group ids")
        inv_c = inv.cpu()
        # centre on each group's first member before taking the group mean (a shift, so the same value):
        # a constant group then gets exactly 0, which the zero-advantage drop of docs/paper.md s4 relies on
        first = torch.full((n_groups,), r.shape[0]).scatter_reduce_(0, inv_c, torch.arange(r.shape[0]), "amin")
        rc = r - r[first][inv_c]
        sums = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inv_c, rc)
        counts = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inv_c, torch.ones_like(rc))
        a = rc - (sums / counts)[inv_c]
        if normalize:
            a = a / (r.std(unbiased=False) + eps)
        w = 1.0 if weights is None else float(weights.get(name, 1.0))
        total = w * a if total is None else total + w * a
    if normalize and len(rewards) > 1:
        # the sum of group-centred advantages has global mean 0, so re-standardising only divides; subtracting
        # its rounding-error mean would turn the exact zeros of constant groups into tiny non-zeros
        total = total / (total.std(unbiased=False) + eps)
    return total.clamp(-clip, clip).to(torch.float32).to(gid.device)


def ppo_clip_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, clip_eps: float) -> torch.Tensor:
    """PPO-clip mean(max(-A rho, -A clip(rho, 1-eps, 1+eps))), rho = exp(logp - logp_old) (docs/paper.md s4, Flow-GRPO).

    logp may be (B,) or (B, steps); advantages (B,) broadcast over steps.
    """
    ratio = torch.exp(logp - logp_old.detach())
    adv = advantages.detach().to(ratio.dtype)
    adv = adv.reshape(adv.shape[0], *([1] * (ratio.dim() - 1)))
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return torch.maximum(unclipped, clipped).mean()


def gaussian_mean_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: SigmaLike) -> torch.Tensor:
    """(B,) KL between equal-variance Gaussian policies, mean_{dims} (mu - mu_ref)^2 / (2 std^2)
    (docs/paper.md s6.5 KL term; mean over dims as the Flow-GRPO code)."""
    return _per_sample_mean((mean - mean_ref) ** 2 / (2 * expand_sigma(std, mean) ** 2))


# ---------------------------------------------------------------------------- SubGRPO
stable_seed = derive_seed  # one stable-hash seed scheme for the whole project (rtdmd.seeding)


def subgrpo_select_steps(num_stochastic: int = 3, num_selected: int = 2, seed: int = 0, epoch: int = 0) -> list[int]:
    """The epoch's trained subset of stochastic steps (docs/paper.md s4 SubGRPO), sorted; a pure function of
    (seed, epoch), so every rank picks the same subset."""
    if not 1 <= int(num_selected) <= int(num_stochastic):
        raise UserError(
            f"SubGRPO selects {num_selected} of {num_stochastic} stochastic steps; choose 1 <= selected <= stochastic."
        )
    g = torch.Generator().manual_seed(stable_seed("subgrpo", seed, epoch))
    return sorted(torch.randperm(int(num_stochastic), generator=g)[: int(num_selected)].tolist())


def group_shared_noise(
    prompt: str,
    step: int,
    epoch: int,
    shape: Sequence[int],
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """N(0, I) noise seeded by a stable hash of (prompt, step, epoch, seed) (docs/paper.md s4 SubGRPO):
    identical for every member of a prompt's group, different across prompts, steps and epochs."""
    g = torch.Generator().manual_seed(stable_seed("subgrpo-noise", seed, epoch, step, prompt))
    z = torch.randn(tuple(shape), generator=g, dtype=torch.float32)
    return z.to(device=device, dtype=dtype) if device is not None or dtype != torch.float32 else z


# ---------------------------------------------------------------------------- GAN head (DMD2)
def gan_discriminator_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """mean softplus(D(fake)) + mean softplus(-D(real)) (docs/paper.md s6.1 GAN head)."""
    return F.softplus(d_fake).mean() + F.softplus(-d_real).mean()


def gan_generator_loss(d_fake: torch.Tensor) -> torch.Tensor:
    """mean softplus(-D(fake)) (docs/paper.md s6.1 GAN head, non-saturating)."""
    return F.softplus(-d_fake).mean()


__all__ = [
    "ambient_dsm_loss",
    "ambient_dsm_target",
    "ambient_weight",
    "consistency_regulariser",
    "dmd_gradient",
    "dmd_loss",
    "euler_jump",
    "flow_matching_loss",
    "gan_discriminator_loss",
    "gan_generator_loss",
    "gaussian_mean_kl",
    "group_advantages",
    "group_shared_noise",
    "lcm_boundary_coefficients",
    "phase_edges",
    "phase_lower_edge",
    "phased_solver_grid",
    "ppo_clip_loss",
    "pseudo_huber",
    "refl_hinge",
    "renoise_subinterval",
    "sample_consistency_t",
    "sample_subinterval_t",
    "stable_seed",
    "subgrpo_select_steps",
    "weighted_mse",
]
