"""LCM (phased consistency distillation, flow port): hand-checked loss, phase edges, sampler, EMA
target, toy2d learning and resume, and every shipped config."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from baselines.lcm import (ConsistencyData, EMATarget, PhasedConsistencyLoss, PhaseSchedule, phased_sampler)
from rtdmd import config as C
from rtdmd import flow, objectives, samplers
from rtdmd.api import make_config, run_training
from rtdmd.backends.base import Backend
from rtdmd.errors import UserError
from rtdmd.methods import blocks
from rtdmd.methods.base import StepContext
from rtdmd.seeding import torch_generator
from runhelp import assert_same_tensors, checkpoint_tensors


# ---------------------------------------------------------------------------- a 1-D backend with hand-made velocities
class LinearVelocity(nn.Module):
    """v(x, s, cond) = a(s) x + b(s) (cond 1) or the unconditional pair (cond 0)."""

    def __init__(self, fn_cond, fn_uncond=None):
        super().__init__()
        self.fn_cond, self.fn_uncond = fn_cond, fn_uncond or fn_cond
        self.w = nn.Parameter(torch.zeros(()))  # a parameter, so the student has a gradient path

    def forward(self, x, s, mode):
        s = flow.expand_sigma(s, x)
        c = mode.reshape(-1, 1).to(x.dtype)
        return c * self.fn_cond(x, s) + (1 - c) * self.fn_uncond(x, s) + 0 * self.w


class HandBackend(Backend):
    name = "hand"
    has_images = False

    def __init__(self, teacher, generator_sigmas=(1.0, 0.9, 0.75, 0.5, 0.0), solver=10):
        super().__init__(None, "cpu")
        self._teacher, self._gen, self._solver = teacher, torch.tensor(generator_sigmas), solver

    def state_shape(self):
        return (1,)

    def sampling_sigmas(self, num_steps):
        return flow.sampling_sigmas(num_steps)

    def generator_sigmas(self, num_steps=4):
        if num_steps == len(self._gen) - 1:
            return self._gen
        return flow.sampling_sigmas(num_steps)

    def encode_prompts(self, prompts):
        return {"mode": torch.tensor([0 if p == "" else 1 for p in prompts])}

    @property
    def teacher(self):
        return self._teacher

    def velocity(self, net, x, sigma, cond):
        return net(x, flow.batch_sigma(sigma, x), cond["mode"])

    def make_trainable(self, role):
        raise NotImplementedError

    def decode(self, x):
        return x

    def network_state(self, net):
        return net.state_dict()

    def load_network_state(self, net, state):
        net.load_state_dict(state)


def _ctx(seed=3):
    return StepContext(step=0, generator=torch.Generator().manual_seed(seed), seed=seed)


def _prompts(b, n, uncond=True):
    p = ["a"] * n
    return blocks.Prompts(p, b.encode_prompts(p), b.encode_prompts([""] * n) if uncond else None)


# ---------------------------------------------------------------------------- phase edges and the solver grid
def test_phase_edges_are_the_generator_sigmas_and_no_solver_step_crosses_an_edge():
    b = HandBackend(LinearVelocity(lambda x, s: x))
    sch = PhaseSchedule(b, 4, 10)
    assert sch.edges.tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])
    # linspace(1, 0, 11) plus the edges 0.75 (0.9, 0.5 are already on it)
    assert sch.grid.tolist() == pytest.approx([1.0, 0.9, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    # with shift 3, the shapes / SD3 generator sigmas are objectives.phase_edges(4, 3)
    assert torch.allclose(objectives.phase_edges(4, shift=3.0).double(), sch.edges, atol=1e-6)
    s, s_prev, e = sch.draw(4000, _ctx(), "cd")
    assert set(s.tolist()) == set(sch.grid[:-1].tolist())  # every non-final grid point is drawn
    assert bool((e <= s_prev).all()) and bool((s_prev < s).all()) and bool((e < s).all())
    # hand values: s = 0.8 -> (0.75, 0.75); s = 0.75 -> (0.7, 0.5); s = 1 -> (0.9, 0.9); s = 0.1 -> (0, 0)
    for sv, sp, ev in [(0.8, 0.75, 0.75), (0.75, 0.7, 0.5), (1.0, 0.9, 0.9), (0.1, 0.0, 0.0), (0.6, 0.5, 0.5)]:
        i = int(torch.nonzero(torch.isclose(s, torch.tensor(sv, dtype=torch.float64)))[0])
        assert (s_prev[i].item(), e[i].item()) == pytest.approx((sp, ev))


# ---------------------------------------------------------------------------- the loss by hand
def test_consistency_loss_matches_a_hand_computation_with_linear_velocities():
    # teacher: v_c = 2x, v_u = -x (CFG w = 3 -> v = -x + 3 (3x) = 8x); target: v = 0.5 x + 1; student: v = -x
    teacher = LinearVelocity(lambda x, s: 2 * x, lambda x, s: -x)
    target = LinearVelocity(lambda x, s: 0.5 * x + 1)
    student = LinearVelocity(lambda x, s: -x)
    b = HandBackend(teacher)
    sch = PhaseSchedule(b, 4, 10)
    n, ctx = 6, _ctx(7)
    x0 = torch.linspace(-1, 1, n).reshape(n, 1)
    c = 0.1
    out = PhasedConsistencyLoss(b, sch, n, guidance=3.0, huber_c=c)(student, target, x0, _prompts(b, n), ctx)
    s, s_prev, e = sch.draw(n, ctx, "cd")
    eps = blocks.global_randn(b, n, ctx, "cd-eps")
    vals, diffs = [], []
    for i in range(n):
        si, sp, ei, x0i, ni = s[i].item(), s_prev[i].item(), e[i].item(), x0[i, 0].item(), eps[i, 0].item()
        xs = (1 - si) * x0i + si * ni
        x_prev = xs + (sp - si) * 8 * xs
        tgt = x_prev + (ei - sp) * (0.5 * x_prev + 1)
        stu = xs + (ei - si) * (-xs)
        d = stu - tgt
        diffs.append(d)
        vals.append(math.sqrt(d * d + c * c) - c)
    assert out.loss.item() == pytest.approx(sum(vals) / n, rel=1e-5)
    mse = PhasedConsistencyLoss(b, sch, n, guidance=3.0, loss="mse")(student, target, x0, _prompts(b, n), ctx)
    assert mse.loss.item() == pytest.approx(sum(d * d for d in diffs) / n, rel=1e-5)


def test_exact_consistency_function_is_a_fixed_point_of_the_target():
    # Data = the point mass m: the teacher velocity v = (x - m)/s is linear in x and its ODE solution is the
    # straight line x(s') = m + (s'/s)(x - m), so Euler solver steps are exact and the phased consistency
    # function is x_e = x + (e - s)(x - m)/s: a student (and target) with that velocity has loss 0 ...
    m = 0.7
    exact = LinearVelocity(lambda x, s: (x - m) / s.clamp(min=1e-6))  # at s = 0 the state is m: v = 0
    b = HandBackend(exact)
    sch = PhaseSchedule(b, 4, 20)
    n, ctx = 64, _ctx(1)
    x0 = torch.full((n, 1), m)
    out = PhasedConsistencyLoss(b, sch, n, guidance=1.0, loss="mse")(exact, exact, x0, _prompts(b, n, uncond=False), ctx)
    assert out.loss.item() < 1e-10
    # ... the jump lands on the exact solution at the lower edge ...
    s, _, e = sch.draw(n, ctx, "cd")
    x_s = out.x_s
    jump = objectives.euler_jump(x_s, out.v.detach(), out.s, e.float())
    sol = m + (e.float() / s.float()).reshape(-1, 1) * (x_s - m)
    assert torch.allclose(jump, sol, atol=1e-5)
    # ... while a student off the solution is penalised
    wrong = LinearVelocity(lambda x, s: 1.1 * (x - m) / s.clamp(min=1e-6))
    assert PhasedConsistencyLoss(b, sch, n, guidance=1.0, loss="mse")(wrong, exact, x0, _prompts(b, n, uncond=False),
                                                                      ctx).loss.item() > 1e-4


def test_per_sample_guidance_range_uses_one_w_per_row():
    teacher = LinearVelocity(lambda x, s: 2 * x, lambda x, s: -x)
    zero = LinearVelocity(lambda x, s: 0 * x)
    b = HandBackend(teacher)
    sch = PhaseSchedule(b, 1, 10)
    n, ctx = 5, _ctx(2)
    x0 = torch.ones(n, 1)
    out = PhasedConsistencyLoss(b, sch, n, guidance=1.0, guidance_range=[2.0, 6.0], loss="mse")(
        zero, zero, x0, _prompts(b, n), ctx)
    s, s_prev, _ = sch.draw(n, ctx, "cd")
    w = 2.0 + 4.0 * torch.rand(n, generator=torch_generator(ctx.seed, "cd-w"))
    xs = out.x_s[:, 0].double()
    x_prev = xs + (s_prev - s) * (-1 + w.double() * 3) * xs  # v = v_u + w (v_c - v_u) = (-1 + 3w) x
    # student and target have zero velocity: x_e = x_s, target = x_prev
    assert out.loss.item() == pytest.approx(float(((xs - x_prev) ** 2).mean()), rel=1e-5)


# ---------------------------------------------------------------------------- sampler and target
def test_sampler_spec_and_eta0_cps_is_the_students_jump():
    assert phased_sampler(4, 4, 1.0).__dict__ == {"kind": "cps", "steps": 4, "guidance": 1.0, "eta": 0.0}
    assert phased_sampler(1, 4, 1.0).__dict__ == {"kind": "cps", "steps": 4, "guidance": 1.0, "eta": 1.0}
    x, v = torch.randn(3, 2), torch.randn(3, 2)
    # CPS with eta = 0 from s to the next edge e is x + (e - s) v, so the checkpoint's "cps" sampler runs the phased model
    assert torch.allclose(samplers.cps_step(x, v, 0.9, 0.75, 0.0, None), objectives.euler_jump(x, v, 0.9, 0.75), atol=1e-6)


def test_ema_target_follows_the_student_with_decay():
    b = HandBackend(LinearVelocity(lambda x, s: x))
    student = nn.Linear(1, 1)
    with torch.no_grad():
        student.weight.fill_(1.0)
        student.bias.fill_(0.0)
    tgt = EMATarget(b, student, decay=0.95)
    assert not any(p.requires_grad for p in tgt.net.parameters())
    with torch.no_grad():
        student.weight.fill_(3.0)
    tgt.update(student)
    assert tgt.net.weight.item() == pytest.approx(0.95 * 1.0 + 0.05 * 3.0)
    tgt.update(student)
    assert tgt.net.weight.item() == pytest.approx(0.95 * 1.1 + 0.05 * 3.0)
    st = tgt.state_dict()
    tgt.update(student)
    tgt.load_state_dict(st)
    assert tgt.net.weight.item() == pytest.approx(0.95 * 1.1 + 0.05 * 3.0)


def test_backend_data_on_a_prompt_only_backend_is_a_user_error():
    b = HandBackend(LinearVelocity(lambda x, s: x))
    with pytest.raises(UserError, match="method.data=generator"):
        ConsistencyData(b, "backend", 4, 0, False, 0)


def test_option_errors():
    with pytest.raises(UserError, match="phases"):
        make_config("lcm", backend="toy2d", overrides={"method": {"phases": 0}})
    with pytest.raises(UserError, match="guidance_range"):
        make_config("lcm", backend="toy2d", overrides={"method": {"guidance_range": [3.0]}})


# ---------------------------------------------------------------------------- configs
CONFIG_DIR = Path(C.CONFIG_DIR)


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*/lcm*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_lcm_config_resolves(path):
    preset = path.stem.split("@", 1)[1] if "@" in path.stem else None
    cfg = make_config("lcm", backend=path.parent.name, preset=preset)
    assert cfg.method.phases >= 1
    if path.parent.name in ("sd3", "flux2"):
        assert cfg.method.data == "generator" and cfg.method.ema_decay is None  # prompt-only, LoRA handles


# ---------------------------------------------------------------------------- toy2d end to end
def _toy_overrides(steps, **train):
    return {"train": {"max_steps": steps, "device": "cpu", "num_threads": 1, **train}, "tracking": {"enabled": False}}


def test_toy2d_four_step_lcm_matches_the_mixture_teacher(tmp_path):
    from benchmarks.toy2d_metrics import matches_teacher
    from rtdmd import checkpoint as ckpt
    from rtdmd.generate import SamplingConfig, generate

    over = {"train": {"device": "cpu", "num_threads": 1}, "tracking": {"enabled": False}}  # the shipped toy2d config
    res = run_training(make_config("lcm", backend="toy2d", overrides=over), out=tmp_path / "run", show_progress=False)
    _, b, net, meta = ckpt.load_for_inference(res.checkpoint)
    assert meta["sampler"] == {"kind": "cps", "steps": 4, "guidance": 1.0, "eta": 0.0}
    n = 2000
    keys = lambda seed: [(seed, "toy", i) for i in range(n)]  # noqa: E731
    teacher_sc = SamplingConfig(kind="euler", steps=200)
    a = generate(b, b.teacher, [""] * n, keys(1), teacher_sc)
    c = generate(b, b.teacher, [""] * n, keys(2), teacher_sc)
    x = generate(b, net, [""] * n, keys(3), SamplingConfig.from_meta(meta["sampler"]))
    ok, m, ref = matches_teacher(x, a, c)
    print(f"toy2d lcm: MMD {m:.4f} vs teacher-teacher {ref:.4f} (ratio {m / ref:.2f}, criterion 2)")  # shown with -s
    assert ok, (m, ref)
    # the test can fail: the teacher's own 4-step Euler on the same edges does not match
    euler4 = generate(b, b.teacher, [""] * n, keys(3), SamplingConfig(kind="cps", steps=4, eta=0.0))
    assert not matches_teacher(euler4, a, c)[0]


def assert_toy2d_resume_is_exact(method: str, overrides: dict, stop_at: int, tmp_path: Path):
    """Train straight through, and stopped at ``stop_at`` then resumed: same weights and EMA target; the resumed run."""
    full = run_training(make_config(method, backend="toy2d", overrides=overrides), out=tmp_path / "full", show_progress=False)
    part = dict(overrides, train=dict(overrides["train"], max_steps=stop_at))
    run_training(make_config(method, backend="toy2d", overrides=part), out=tmp_path / "res", show_progress=False)
    res = run_training(make_config(method, backend="toy2d", overrides=overrides), out=tmp_path / "res", resume=True,
                       show_progress=False)
    assert_same_tensors(checkpoint_tensors(full.checkpoint), checkpoint_tensors(res.checkpoint))
    load = lambda p: torch.load(Path(p) / "state" / "trainer.pt", weights_only=False)["method"]["target"]  # noqa: E731
    ta, tb = load(full.checkpoint), load(res.checkpoint)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    return res


def test_toy2d_resume_is_exact(tmp_path):
    sets = {"backend": {"hidden": 16, "depth": 2}, "method": {"solver_steps": 10, "prefetch": 0},
            **_toy_overrides(6, batch_size=8, checkpoint_every=3)}
    assert_toy2d_resume_is_exact("lcm", sets, 3, tmp_path)
