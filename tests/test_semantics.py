"""The training-semantics switches of docs/paper.md s4b on hand numbers: when the EMA is updated
(train.ema_on, ema_warmup, ema_per_micro_batch), gradient accumulation (train.accumulate), the stage-2
per-step loss weights (method.step_average), the stage-2 advantages over all micro-batches, and AC-DMD's
fake score first on a rollout of its own (method.fake_first)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from rtdmd import objectives
from rtdmd.api import make_config
from rtdmd.config import OptimConfig
from rtdmd.ema import ema_decay_at
from rtdmd.errors import UserError
from rtdmd.methods.base import Method, SamplerSpec, StepContext, Update
from rtdmd.registry import register_method
from rtdmd.seeding import torch_generator
from rtdmd.trainer import Trainer


class Scalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))


@dataclass
class ScalarOptions:
    every: int = 2  # the generator steps on iterations step % every == 0
    lr: float = 0.1
    ema_decay: float = 0.99
    accumulates: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self):
        pass


class ScalarMethod(Method):
    """One scalar p, loss -p (gradient -1): Adam moves p by lr (to 1e-8) at every step it takes, so the
    weights are 0.1, 0.1, 0.2 after iterations 0, 1, 2 with every 2 and lr 0.1."""

    def __init__(self, cfg, backend):
        super().__init__(cfg, backend)
        o = self.options
        self.accumulates = o.accumulates
        self.networks = {"generator": Scalar()}
        self.updates = [Update("generator", every=o.every, optim=OptimConfig(lr=o.lr), ema_decay=o.ema_decay)]
        self.micro_seen: list[tuple[int, int]] = []

    def loss(self, network, ctx):
        self.micro_seen.append((ctx.step, ctx.micro))
        return -self.networks["generator"].p, {}

    def sampler(self):
        return SamplerSpec(kind="cps", steps=1)


register_method("test-scalar", ScalarOptions, backends=("toy2d",), default_backend="toy2d",
                help="a scalar for the EMA tests")(ScalarMethod)


def _ema_after(tmp_path, steps=3, **train):
    cfg = make_config("test-scalar", backend="toy2d",
                      overrides={"backend": {"hidden": 8, "depth": 1},
                                 "method": {k: train.pop(k) for k in ("every", "ema_decay", "accumulates") if k in train},
                                 "train": {"device": "cpu", "num_threads": 1, "batch_size": 4, "grad_clip": 0.0,
                                           "max_steps": steps, "checkpoint_every": 1000, **train},
                                 "tracking": {"enabled": False}})
    t = Trainer(cfg, tmp_path / "run", show_progress=False)
    t.run()
    return float(t.emas["generator"].p.detach()), float(t.method.networks["generator"].p.detach()), t.method


def test_warmup_decay_hand_values():
    assert ema_decay_at(0, 0.99, True) == pytest.approx(0.1)
    assert ema_decay_at(1, 0.99, True) == pytest.approx(2 / 11)
    assert ema_decay_at(1000, 0.99, True) == 0.99  # (1001 / 1010) > 0.99: the decay itself
    assert ema_decay_at(0, 0.99, False) == 0.99


@pytest.mark.parametrize("ema_on, warmup, expected", [
    # iteration + warm-up (the reference): d = 1/10, 2/11, 3/12 on weights 0.1, 0.1, 0.2
    ("iteration", True, 0.25 * ((2 / 11) * 0.09 + (9 / 11) * 0.1) + 0.75 * 0.2),
    # iteration, no warm-up: 0.99 three times
    ("iteration", False, 0.99 * (0.99 * 0.001 + 0.01 * 0.1) + 0.01 * 0.2),
    # update (the EMA only where the generator steps: iterations 0 and 2) + warm-up: d = 1/10, 3/12
    ("update", True, 0.25 * 0.09 + 0.75 * 0.2),
    # update, no warm-up
    ("update", False, 0.99 * 0.001 + 0.01 * 0.2),
])
def test_ema_after_three_iterations_with_ttur_2(tmp_path, ema_on, warmup, expected):
    ema, net, _ = _ema_after(tmp_path, ema_on=ema_on, ema_warmup=warmup)
    assert net == pytest.approx(0.2, abs=1e-6)
    assert ema == pytest.approx(expected, abs=1e-6)


def test_ema_once_per_micro_batch(tmp_path):
    """accumulate 2, ema_per_micro_batch: at the EMA step the decay is applied twice: 0.81 * 0 + 0.19 * 0.1;
    each micro-batch's loss -p / 2 sums to the gradient -1, so p still moves by lr."""
    ema, net, m = _ema_after(tmp_path, steps=1, every=1, ema_decay=0.9, accumulates=True, accumulate=2,
                             ema_per_micro_batch=True, ema_on="iteration")
    assert net == pytest.approx(0.1, abs=1e-6)
    assert ema == pytest.approx(0.19 * 0.1, abs=1e-6)
    assert m.micro_seen == [(0, 0), (0, 1)]


def test_accumulate_needs_a_method_that_splits_its_batch(tmp_path):
    with pytest.raises(UserError, match="train.accumulate=2"):
        _ema_after(tmp_path, steps=1, accumulate=2)


@dataclass
class QuadOptions:
    accumulate_rows: int = 4

    def validate(self):
        pass


class QuadMethod(Method):
    """loss = mean over the micro-batch's rows of (w . x)^2, x drawn from the micro-batch's own context."""

    accumulates = True

    def __init__(self, cfg, backend):
        super().__init__(cfg, backend)
        self.networks = {"generator": nn.Linear(3, 1, bias=False)}
        self.updates = [Update("generator", optim=OptimConfig(lr=1e-3))]

    def rows(self, ctx):
        return torch.randn(self.cfg.train.batch_size, 3, generator=ctx.generator)

    def loss(self, network, ctx):
        return (self.networks["generator"](self.rows(ctx)) ** 2).mean(), {}

    def sampler(self):
        return SamplerSpec(kind="cps", steps=1)


register_method("test-quad", QuadOptions, backends=("toy2d",), default_backend="toy2d", help="quadratic")(QuadMethod)


def test_accumulated_gradient_is_the_big_batch_gradient(tmp_path):
    """train.accumulate 3: the summed micro-batch gradients, each loss divided by 3, equal the gradient of the
    mean loss over the 3 micro-batches' rows together; micro-batch j draws from ctx.micro_batch(j)."""
    cfg = make_config("test-quad", backend="toy2d",
                      overrides={"backend": {"hidden": 8, "depth": 1},
                                 "train": {"device": "cpu", "batch_size": 5, "accumulate": 3, "max_steps": 1},
                                 "tracking": {"enabled": False}})
    t = Trainer(cfg, tmp_path / "run", show_progress=False)
    t._setup()
    ctx = StepContext(step=0, generator=torch_generator(11), seed=11, micro_batches=3)
    net = t.method.networks["generator"]
    loss, _ = t._accumulate("generator", net, ctx)
    grad = net.weight.grad.clone()
    again = StepContext(step=0, generator=torch_generator(11), seed=11, micro_batches=3)  # the same draws afresh
    rows = torch.cat([t.method.rows(again.micro_batch(j)) for j in range(3)])
    assert not torch.equal(rows[:5], rows[5:10])  # each micro-batch draws its own rows
    w = net.weight.detach().clone().requires_grad_(True)
    big = ((rows @ w.T) ** 2).mean()
    big.backward()
    assert torch.allclose(grad, w.grad, atol=1e-6)
    assert loss == pytest.approx(big.item(), rel=1e-5)
    assert ctx.micro_batch(0) is ctx and ctx.micro_batch(2).micro == 2


def test_step_weights_under_subgrpo():
    """Each trained step's loss / trained steps (docs/paper.md s4b): 2 picked GRPO steps + the last step ->
    2/3 PPO : 1/3 (BP + DM); all 3 stochastic steps -> 3/4 : 1/4; step_average off -> 1 : 1."""
    from types import SimpleNamespace

    from rtdmd.methods.rtdmd import RtdmdMethod, RtdmdOptions

    def weights(selected, **o):
        fake = SimpleNamespace(options=RtdmdOptions(**o), selected=selected, bp_rewards={"r": None})
        return RtdmdMethod.step_weights(fake)

    assert weights([0, 2]) == (pytest.approx(2 / 3), pytest.approx(1 / 3))
    assert weights([0, 1, 2]) == (pytest.approx(3 / 4), pytest.approx(1 / 4))
    assert weights([0, 2], step_average=False) == (1.0, 1.0)
    assert weights([0, 2], grpo_weight=0.0) == (0.0, 1.0)  # only the last step is trained
    assert weights([0, 2], bp_weight=0.0, dm_weight=0.0)[0] == 1.0  # only the GRPO steps: PPO weight 1


def test_advantages_over_all_micro_batches():
    """GroupRollout.with_advantages: the group advantages of 2 micro-batches are those of their rewards
    concatenated (the global batch is every micro-batch), each batch keeping its own rows."""
    from rtdmd.backends.toy2d import Toy2DOptions, make_toy2d
    from rtdmd.methods import grpo

    b = make_toy2d(Toy2DOptions(hidden=8, depth=1))
    net = b.make_trainable("generator")
    ro = grpo.GroupRollout(b, {"x": lambda x, p: x[:, 0]}, grpo.CpsPolicy(b.generator_sigmas(4)), 2, 4)
    ctx = StepContext(step=0, generator=torch_generator(5), seed=5, micro_batches=2)
    batches = ro.with_advantages([ro.sample(net, ctx.micro_batch(j)) for j in range(2)], ctx)
    scores = torch.cat([x.rewards["x"] for x in batches])
    expected = objectives.group_advantages({"x": scores}, torch.arange(4).repeat_interleave(4))
    assert torch.allclose(torch.cat([x.advantages for x in batches]), expected)
    alone = ro.with_advantages([ro.sample(net, ctx.micro_batch(1))], ctx)[0]  # its own batch: other std
    assert torch.equal(alone.rewards["x"], batches[1].rewards["x"])
    assert not torch.allclose(alone.advantages, batches[1].advantages)


def test_ac_dmd_fake_first_draws_its_own_rollout():
    """fake_first: the fake score steps first, on a rollout with its own prompts, k and noise; the generator's
    sample (its own draws) is made afterwards; false: the generator first, the fake score on its sample."""
    from rtdmd.methods.ac_dmd import AcDmdMethod
    from rtdmd.registry import get_backend

    over = {"backend": {"hidden": 8, "depth": 1, "teacher": "exact"}, "method": {"guidance": 1.0, "init": ""},
            "train": {"batch_size": 8}}
    cfg = make_config("ac-dmd", backend="toy2d", overrides=over)
    b = get_backend("toy2d").factory(cfg.backend, "cpu")
    m = AcDmdMethod(cfg, b)
    assert [u.network for u in m.updates] == ["fake_score", "generator"]
    seen = []
    real = m.fake_sample

    def spy(net, p, ctx, k, grad=True):
        seen.append(("fake", k, grad))
        return real(net, p, ctx, k, grad=grad)

    m.fake_sample = spy
    ctx = StepContext(step=0, generator=torch_generator(9), seed=9)
    m.before_step(ctx)
    g = torch_generator(9)
    k_gen, k_fake = (int(torch.randint(1, 5, (1,), generator=g)) for _ in range(2))
    assert (m._k, m._fake_k) == (k_gen, k_fake)
    m.loss("fake_score", ctx)
    assert seen == [("fake", k_fake, False)] and m._cache is None  # nothing shared with the generator
    m.loss("generator", ctx)
    assert m._cache is not None and m._cache[2].prompts is not None
    legacy = AcDmdMethod(make_config("ac-dmd", backend="toy2d", overrides={**over, "method": {**over["method"],
                                                                                               "fake_first": False}}), b)
    assert [u.network for u in legacy.updates] == ["generator", "fake_score"]
