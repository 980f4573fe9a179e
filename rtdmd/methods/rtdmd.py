"""RTDMD (docs/paper.md s4): stage 1 AC-DMD, then stage 2 reward-tilted DMD.

Registered as ``rtdmd``: stage 1 then stage 2 (``method.stage: 0``), or one stage (``stage: 1`` / ``2``);
stage 2 starts from a stage-1 checkpoint (``method.init``: generator and fake score). A two-stage run is
two trainer runs, ``<out>/stage1`` (an ``ac-dmd`` run, rtdmd.methods.ac_dmd) and ``<out>/stage2``,
declared by ``RtdmdOptions.stages`` and run by rtdmd.stages. Formulas live in rtdmd.flow / samplers /
objectives; the loss blocks that wire them to the networks in rtdmd.methods.blocks.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import torch

from rtdmd import checkpoint as ckpt
from rtdmd import diagnostics, flow, objectives, samplers
from rtdmd.config import OptimConfig, RunConfig, TrainConfig, build_dataclass
from rtdmd.errors import UserError
from rtdmd.methods import blocks, grpo
from rtdmd.methods.ac_dmd import BACKENDS, AcDmdMethod, AcDmdOptions
from rtdmd.methods.base import Method, SamplerSpec, StepContext, Update
from rtdmd.registry import register_method
from rtdmd.rewards.registry import get_reward, is_differentiable, reward_names


def _paper_rewards() -> dict[str, float]:
    # shapes analogues of GenEval partial credit + the learned preference / aesthetic models (each weight 1)
    return {"geneval_partial": 1.0, "shapes_pref": 1.0, "shapes_aes": 1.0}


@dataclass
class RtdmdOptions:
    """Stage 2 (docs/paper.md s4) plus what a two-stage run needs (``stage``, ``init``, ``stage1``, ``stage1_train``)."""

    stage: int = 0  # 0: stage 1 then stage 2; 1: AC-DMD alone; 2: RTDMD alone (needs init)
    init: str = ""  # stage 2: a stage-1 checkpoint (generator from its EMA weights, fake score from its state)
    stage1: AcDmdOptions = field(default_factory=AcDmdOptions)  # the stage-1 method options
    stage1_train: dict = field(default_factory=dict)  # train.* overrides for stage 1 (max_steps, batch_size, ...)
    # --- rollouts and groups
    guidance: float = 4.0  # teacher CFG in the DM term, as in stage 1 (docs/paper.md s4)
    group_size: int = 8  # K: every prompt K times in the global batch (train.batch_size = groups x K)
    eta: float = 0.9  # CPS, steps 0..n-2 stochastic, last step deterministic (docs/paper.md s4)
    log_prob: Literal["gaussian", "simplified"] = "simplified"  # reference code's -mean((x' - mu)^2) (docs/paper.md s2)
    # --- GRPO
    rewards: dict = field(default_factory=_paper_rewards)  # reward name -> weight (rtdmd.rewards.registry names)
    bp_rewards: list = field(default_factory=list)  # rewards back-propagated (empty: every differentiable one)
    grpo_steps: Literal["subset", "all"] = "subset"  # SubGRPO, or GRPO on every stochastic step (ablation)
    subgrpo_steps: int = 2  # 2 of the 3 stochastic steps per epoch (docs/paper.md s4)
    grpo_weight: float = 1.0  # weight of the PPO-clip term
    #: each trained step's loss divided by the number of trained steps (the picked GRPO steps and the last,
    #: back-propagated step), as the reference: 2/3 PPO + 1/3 (BP + DM) under SubGRPO (docs/paper.md s4b);
    #: false: PPO + BP + DM summed
    step_average: bool = True
    clip_eps: float = 1.0e-5  # PPO clip (docs/paper.md s4)
    advantage_clip: float = 5.0  # (docs/paper.md s4)
    advantage_eps: float = 1.0e-4
    advantage_normalize: bool = True  # per-reward std normalisation and global re-standardisation (docs/paper.md s4)
    # --- reward back-propagation and the DM term on the last deterministic step
    bp_weight: float = 1.0e-4  # L_BP = bp_weight * mean relu(margin - sum_j r_j(x0)) (docs/paper.md s4)
    bp_margin: float = 3.0  # the reference code's margin (3 for CLIP+HPS+Pick scales; shapes: see configs)
    dm_weight: float = 1.0e-3  # + dm_weight * L_AC-DMD at s = 0 (docs/paper.md s4); 0 = pure reward maximisation
    dm_grad: Literal["last", "all"] = "last"  # gradient through the last step only (paper) or the whole rollout
    dm_t_min: float = 0.02  # t clamp of the DM term and of the fake-score update (docs/paper.md s3 step 4)
    dm_t_max: float = 0.98
    #: how t is drawn in [dm_t_min, dm_t_max] for the DM term and the fake score: AC-DMD's sub-interval draw
    #: above s = 0 (clamped, docs/paper.md s3 step 4) or uniform on the range
    dm_t_draw: Literal["subinterval", "uniform"] = "subinterval"
    #: "kl": each row's DM gradient scaled by D (1 - t)^2 / t^2 (blocks.kl_level_weight), so the DM term is
    #: the mean over t of grad KL_t (a range of noise levels; docs/toy2d-family.md); "none": as is
    dm_level_weight: Literal["none", "kl"] = "none"
    normalize: bool = True  # DMD normalisation of the DM gradient (docs/paper.md s3 step 6)
    # --- diagnostics (train.diagnostics, logged steps): rewards scored on the epoch's rollouts beside the
    # training rewards, never trained on: monitor reward -> the training rewards it is the truth for; logged as
    # monitor/<monitor> and monitor/gap/<reward> = mean(reward - monitor) (the reward-hacking gap)
    monitor: dict = field(default_factory=dict)
    # --- fake score (one update per epoch, before the generator step)
    consistency_weight: float = 0.01  # L_ADSM + 0.01 L_cons (docs/paper.md s4)
    adsm_weight_clamp: float = 10.0
    generator_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-6, weight_decay=1e-4))  # docs/paper.md s4
    fake_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-5))  # docs/paper.md s4
    ema_decay: float = 0.9  # EMA 0.9 (every train.ema_every = 8 steps, docs/paper.md s4)

    def validate(self):
        if self.stage not in (0, 1, 2):
            raise UserError(f"method.stage must be 0 (both stages), 1 or 2 (got {self.stage}).")
        if self.group_size < 2:
            raise UserError(f"method.group_size must be at least 2 (got {self.group_size}); the paper uses 16 or 24.")
        if not 0.0 < self.eta <= 1.0:
            raise UserError(f"method.eta must be in (0, 1] so the rollout's steps are stochastic (got {self.eta}).")
        if not 0.0 < self.dm_t_min <= self.dm_t_max < 1.0:
            raise UserError(f"method.dm_t_min/dm_t_max must satisfy 0 < min <= max < 1 (got {self.dm_t_min}, {self.dm_t_max}).")
        if self.dm_level_weight == "kl" and self.normalize:
            raise UserError("method.dm_level_weight: kl scales the raw DM gradient; set method.normalize: false with it.")
        if not self.rewards and self.dm_weight <= 0:
            raise UserError("stage 2 needs at least one reward in method.rewards or a positive method.dm_weight.")
        if any((not isinstance(w, (int, float))) or isinstance(w, bool) for w in self.rewards.values()):
            raise UserError("method.rewards maps reward names to numeric weights, e.g. {shapes_pref: 1.0}.")
        missing = [r for r in self.bp_rewards if r not in self.rewards]
        if missing:
            raise UserError(f"method.bp_rewards names '{missing[0]}', which is not in method.rewards; list only training rewards.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"method.ema_decay must be in [0, 1) (got {self.ema_decay}).")
        for mon, learned in self.monitor.items():
            if not isinstance(learned, list) or any(r not in self.rewards for r in learned):
                raise UserError(f"method.monitor maps a monitor reward to a list of training rewards from method.rewards "
                                f"(got {mon}: {learned}); e.g. monitor: {{oracle: [shapes_pref]}}.")
        self.stage1_train_config(TrainConfig())  # raises on unknown keys


    def stage1_train_config(self, train: TrainConfig) -> TrainConfig:
        """The stage-1 training loop: ``train`` with ``stage1_train`` merged over it; stage 2's micro-batching
        (``accumulate``, ``ema_per_micro_batch``) is not inherited: stage 1 sets its own or runs without."""
        merged = {**dataclasses.asdict(train), "accumulate": 1, "ema_per_micro_batch": False, **self.stage1_train}
        return build_dataclass(TrainConfig, merged, "method.stage1_train")

    def stages(self, cfg: RunConfig) -> list[tuple[str, RunConfig]]:
        """The runs of this config (rtdmd.stages): stage 1 (an ac-dmd run), stage 2, or both in order."""
        if self.stage == 1:
            return [("stage1", stage1_config(cfg))]
        if self.stage == 2:
            return [("stage2", cfg)]
        check_rewards(self)  # before stage 1 spends its time
        return [("stage1", stage1_config(cfg)), ("stage2", stage2_config(cfg))]


# ---------------------------------------------------------------------------- stage 2: RTDMD


def load_init(backend, networks: dict, init: str) -> dict:
    """Stage 2's start: the generator from a stage-1 checkpoint's inference (EMA) weights and the fake
    score from its training state (docs/paper.md s4: initialise from stage 1, generator and fake score)."""
    step_dir = ckpt.find_checkpoint(init)
    meta = ckpt.read_meta(step_dir)
    if meta.get("backend") != backend.name:
        raise UserError(f"method.init {step_dir} was trained on backend '{meta.get('backend')}', not '{backend.name}'; "
                        "pass a stage-1 checkpoint of the same backend.")
    backend.load_network_state(networks["generator"], ckpt.load_model_state(step_dir))
    if "fake_score" in networks:
        state = ckpt.load_training_state(step_dir)["tensors"]
        if "net_fake_score" not in state:
            raise UserError(f"method.init {step_dir} holds no fake score (state/net_fake_score.safetensors); pass an "
                            "ac-dmd, rtdmd or dmd2 checkpoint, which save both networks.")
        backend.load_network_state(networks["fake_score"], state["net_fake_score"])
    return meta


def load_rewards(options: RtdmdOptions, backend) -> tuple[dict, dict]:
    """(every training reward, the back-propagated ones): name -> Reward from rtdmd.rewards.registry.
    Back-propagated: ``bp_rewards``, or every differentiable training reward when it is empty."""
    bp = list(options.bp_rewards) or [n for n in options.rewards if is_differentiable(n)]
    bad = [n for n in bp if not is_differentiable(n)]
    if bad:
        raise UserError(f"reward '{bad[0]}' in method.bp_rewards is not differentiable; it can enter through GRPO only.")
    loaded = {**blocks.load_rewards([n for n in options.rewards if n not in bp], backend, differentiable=False),
              **blocks.load_rewards(bp, backend, differentiable=True)}
    return {n: loaded[n] for n in options.rewards}, {n: loaded[n] for n in bp}


class RtdmdMethod(Method):
    """Stage 2 (docs/paper.md s4). One trainer step = one epoch: fresh grouped rollouts, train.accumulate
    micro-batches of train.batch_size (before_step), one fake-score update on their final samples, one
    generator step on w_pg * grpo_weight * PPO(selected steps) + w_last * (L_BP + dm_weight * L_DM) (last,
    deterministic step), the weights from ``step_weights``; the trainer divides each micro-batch's loss by
    their number (docs/paper.md s4b)."""

    inference_network = "generator"
    accumulates = True  # train.accumulate micro-batches of train.batch_size rollouts per epoch (docs/paper.md s4b)

    def __init__(self, cfg: RunConfig, backend):
        super().__init__(cfg, backend)
        o = self.options
        if cfg.train.batch_size % o.group_size:
            raise UserError(f"train.batch_size={cfg.train.batch_size} is not a multiple of method.group_size={o.group_size}; "
                            "stage 2's global batch is (prompt groups) x K.")
        if not o.init:
            raise UserError("rtdmd stage 2 starts from a stage-1 checkpoint; pass --init <ac-dmd run or checkpoint> "
                            "or run both stages with --stage omitted.")
        self.n_groups = cfg.train.batch_size // o.group_size
        self.networks["generator"] = backend.make_trainable("generator")
        if o.dm_weight > 0:
            self.networks["fake_score"] = backend.make_trainable("fake_score")
        self.init_meta = load_init(backend, self.networks, o.init)
        self.rewards, self.bp_rewards = load_rewards(o, backend)
        self.sigmas = backend.generator_sigmas()
        self.stochastic = list(range(len(self.sigmas) - 2))  # every step but the last (docs/paper.md s4)
        if o.grpo_steps == "subset" and not 1 <= o.subgrpo_steps <= len(self.stochastic):
            raise UserError(f"method.subgrpo_steps must be in 1..{len(self.stochastic)} (got {o.subgrpo_steps}).")
        # the fake score is updated first, on the rollout, then the generator (docs/paper.md s4)
        self.updates = ([Update("fake_score", every=1, optim=o.fake_optim)] if "fake_score" in self.networks else []) + \
                       [Update("generator", every=1, optim=o.generator_optim, ema_decay=o.ema_decay)]
        n, levels = cfg.train.batch_size, blocks.NoiseLevels(o.dm_t_draw == "uniform", o.dm_t_min, o.dm_t_max)
        policy = grpo.CpsPolicy(self.sigmas, o.eta, 1.0, o.log_prob)
        advantages = grpo.Advantages(o.advantage_clip, o.advantage_eps, o.rewards, o.advantage_normalize)
        self.rollout = grpo.GroupRollout(backend, self.rewards, policy, self.n_groups, o.group_size, advantages, tag="rt")
        self.policy_loss = grpo.PolicyLoss(backend, policy, o.clip_eps, drop_zero_advantage=True)
        self.bp = blocks.RewardHinge(self.bp_rewards, {"__sum__": o.bp_margin}, o.bp_weight)
        self.dm = blocks.DMLoss(backend, n, o.guidance, o.eta, o.normalize, levels, tag="rt-dm",
                                kl_levels=o.dm_level_weight == "kl")
        # one fake-score update per epoch on the rollout's final x0, s = 0: ADSM + consistency (docs/paper.md s4)
        self.fake = blocks.FakeScoreLoss(backend, n, levels, o.adsm_weight_clamp,
                                         blocks.Consistency(o.consistency_weight, eta=o.eta), tag="rt-fake")
        self.monitors = {m: get_reward(m, backend=backend, device=backend.device) for m in o.monitor}
        self.term_grads = diagnostics.TermGradients("diag", cosine_terms=("grpo",))
        self.monitor_logs: dict[str, float] = {}
        self.batches: list[grpo.GRPOBatch] = []  # this epoch's micro-batches (train.accumulate)
        self.batch: grpo.GRPOBatch | None = None  # the micro-batch of the current loss call
        self.selected: list[int] = []

    # ------------------------------------------------------------------ rollout
    def selected_steps(self, epoch: int) -> list[int]:
        """This epoch's trained stochastic steps: a shared random subset (SubGRPO) or all of them."""
        o = self.options
        if o.grpo_steps == "all" or o.subgrpo_steps == len(self.stochastic):
            return list(self.stochastic)
        return objectives.subgrpo_select_steps(len(self.stochastic), o.subgrpo_steps, seed=self.cfg.train.seed, epoch=epoch)

    def rollout_noises(self, ctx: StepContext, selected: list[int]) -> list[torch.Tensor | None]:
        """Per-step noise for this process's rows: None (fresh per-sample noise, drawn by the rollout) at
        trained steps; at the other stochastic steps one noise per prompt group, shared by its K members
        (docs/paper.md s4 SubGRPO), seeded by (group, prompt, step, epoch); the group index (over the epoch's
        micro-batches) keeps repeated prompts apart."""
        b = self.backend
        prompts, gids = grpo.grouped_prompts(b, self.n_groups, self.options.group_size, ctx, tag="rt-groups")
        gids = gids + ctx.micro * self.n_groups
        noises: list[torch.Tensor | None] = []
        for i in range(len(self.sigmas) - 1):
            if i in selected or i not in self.stochastic:
                noises.append(None)
                continue
            noises.append(torch.stack([objectives.group_shared_noise(f"{int(g)}:{p}", i, ctx.step, b.state_shape(),
                                                                     seed=self.cfg.train.seed)
                                       for p, g in zip(prompts, gids.tolist())]).to(b.device))
        return noises

    def before_step(self, ctx: StepContext) -> None:
        """The epoch's rollouts: one grouped rollout per micro-batch (each from its own context), their
        advantages over all of them together (docs/paper.md s4b)."""
        self.selected = self.selected_steps(ctx.step)
        gen, micro = self.networks["generator"], [ctx.micro_batch(j) for j in range(ctx.micro_batches)]
        self.batches = self.rollout.with_advantages(
            [self.rollout.sample(gen, c, self.rollout_noises(c, self.selected)) for c in micro], ctx)
        self.batch = self.batches[0]
        self.monitor_logs = self.monitor_rollouts() if ctx.diagnose else {}

    @torch.no_grad()
    def monitor_rollouts(self) -> dict[str, float]:
        """The monitor rewards on this epoch's rollouts and each learned reward's mean gap to its monitor."""
        out: dict[str, float] = {}
        prompts = [p for b in self.batches for p in b.prompts]
        images = torch.cat([b.images for b in self.batches])
        for name, reward in self.monitors.items():
            truth = reward(images, prompts).detach().float().reshape(-1)
            out[f"monitor/{name}"] = float(truth.mean())
            for learned in self.options.monitor[name]:
                scores = torch.cat([b.rewards[learned] for b in self.batches]).to(truth.device)
                out[f"monitor/gap/{learned}"] = float((scores - truth).mean())
        return out

    def step_logs(self, ctx: StepContext, logs: dict[str, float]) -> dict[str, float]:
        """On a diagnosed epoch: each term's gradient norm over the epoch's micro-batches (as weighted in the
        loss), the cosine of the GRPO gradient with the previous diagnosed epoch's, and the monitor rewards."""
        if not ctx.diagnose:
            return {}
        return {**self.term_grads.logs(), **self.monitor_logs}

    def step_weights(self) -> tuple[float, float]:
        """(PPO weight, weight of BP + DM): with ``step_average`` each trained step counts 1 / (trained steps),
        the PPO term being the mean over its picked steps (docs/paper.md s4b); else (1, 1)."""
        o = self.options
        n_pg = len(self.selected) if o.grpo_weight > 0 else 0
        last = int((bool(self.bp_rewards) and o.bp_weight > 0) or o.dm_weight > 0)
        if not o.step_average or n_pg + last == 0:
            return 1.0, 1.0
        return n_pg / (n_pg + last), 1.0 / (n_pg + last)

    # ------------------------------------------------------------------ losses
    def _prompts(self) -> blocks.Prompts:
        b, batch = self.backend, self.batch
        return blocks.Prompts(batch.prompts, batch.cond,
                              b.uncond(len(batch.prompts)) if self.options.guidance != 1.0 else None)

    def last_step_x0(self) -> torch.Tensor:
        """x0 = x_t - s v_theta(x_t) on the last, deterministic step, x_t detached (docs/paper.md s4): the
        gradient reaches the generator through that one network call."""
        b, r = self.backend, self.batch.rollout
        x_last, s = r.states[-2].detach(), r.sigmas[-2]
        v = b.velocity(self.networks["generator"], x_last, flow.batch_sigma(s, x_last), self.batch.cond)
        return flow.x0_from_v(x_last, v, s)

    def replayed_x0(self) -> torch.Tensor:
        """The rollout replayed with its own initial state and noises, gradient through every step
        (``dm_grad: all``: the DM term then sees the whole generator, as the exact check needs)."""
        b, r = self.backend, self.batch.rollout
        full = samplers.cps_rollout(blocks.velocity_fn(b, self.networks["generator"], self.batch.cond),
                                    r.states[0].detach(), self.sigmas, self.options.eta, r.noises,
                                    grad_steps=range(len(self.sigmas) - 1), detach_inputs=False)
        return full.final

    def loss(self, network: str, ctx: StepContext):
        o = self.options
        batch = self.batch = self.batches[ctx.micro]
        if network == "fake_score":
            return self.fake(self.networks["fake_score"], batch.rollout.final.detach(), 0.0, self._prompts(), ctx)
        logs: dict[str, float] = {f"reward/{k}": float(v.mean()) for k, v in batch.rewards.items()}
        logs.update({f"grpo/step{i}": float(i in self.selected) for i in self.stochastic})
        terms: dict[str, torch.Tensor] = {}  # each term as it enters the loss
        w_pg, w_last = self.step_weights()
        if o.grpo_weight > 0 and self.selected:
            pg, pg_logs = self.policy_loss(self.networks["generator"], batch, self.selected)
            terms["grpo"] = o.grpo_weight * pg if w_pg == 1.0 else w_pg * o.grpo_weight * pg
            logs.update(pg_logs)
        if (self.bp_rewards and o.bp_weight > 0) or o.dm_weight > 0:
            x0 = self.last_step_x0()
            if self.bp_rewards and o.bp_weight > 0:
                # reward back-propagation through the deterministic last step (docs/paper.md s4)
                bp, _ = self.bp(self.backend.decode(x0), batch.prompts)
                terms["bp"] = bp if w_last == 1.0 else w_last * bp
                logs["loss/bp"] = float(bp.detach())
            if o.dm_weight > 0:
                # the DM term on the same x0 at s = 0, teacher with CFG (docs/paper.md s4); the reward's
                # gradient through the stochastic steps is GRPO's, so only the DM term may use the replay
                x0_dm = self.replayed_x0() if o.dm_grad == "all" else x0
                dm, _ = self.dm(self.networks["fake_score"], x0_dm, 0.0, self._prompts(), ctx)
                terms["dm"] = o.dm_weight * dm if w_last == 1.0 else w_last * o.dm_weight * dm
                logs["loss/dm"] = float(dm.detach())
        if ctx.diagnose and terms:
            params = list(self.backend.trainable_parameters(self.networks["generator"]))
            self.term_grads.add(terms, params, scale=1.0 / ctx.micro_batches)
        total = torch.zeros((), device=self.backend.device)
        for term in terms.values():
            total = total + term
        return total, logs

    def sampler(self) -> SamplerSpec:
        return SamplerSpec(kind="cps", steps=len(self.sigmas) - 1, eta=self.options.eta)


# ---------------------------------------------------------------------------- registration and the two-stage run


def stage1_config(cfg: RunConfig) -> RunConfig:
    """The ``ac-dmd`` run that is stage 1 of an rtdmd config (its stage1 options and stage1_train loop)."""
    o: RtdmdOptions = cfg.method
    tracking = copy.deepcopy(cfg.tracking)
    return RunConfig(method_name="ac-dmd", backend_name=cfg.backend_name, method=copy.deepcopy(o.stage1),
                     backend=copy.deepcopy(cfg.backend), train=o.stage1_train_config(cfg.train), tracking=tracking)


def stage2_config(cfg: RunConfig) -> RunConfig:
    """Stage 2 of a two-stage rtdmd config (rtdmd.stages sets ``method.init`` to stage 1's checkpoint)."""
    c = copy.deepcopy(cfg)
    c.method.stage = 2
    return c


def check_rewards(o: RtdmdOptions) -> None:
    """Stage 2's rewards exist and its back-propagated ones are differentiable."""
    if not o.rewards:
        raise UserError("stage 2 needs at least one reward in method.rewards; on toy2d register your own with "
                        "rtdmd.rewards.registry.register_reward (docs/api.md) and name it there.")
    known = reward_names()
    for name in [*o.rewards, *o.bp_rewards]:
        if name not in known:
            raise UserError(f"unknown reward '{name}' in method.rewards; choose one of {', '.join(known)}, or add your "
                            "own with rtdmd.rewards.registry.register_reward.")
    bad = [n for n in o.bp_rewards if not is_differentiable(n)]
    if bad:
        raise UserError(f"reward '{bad[0]}' in method.bp_rewards is not differentiable; it can enter through GRPO only.")


@register_method("rtdmd", RtdmdOptions, backends=BACKENDS, default_backend="shapes",
                 help="RTDMD: stage 1 (AC-DMD) then stage 2 (reward-tilted DMD: SubGRPO + reward back-propagation + DM)")
def make_rtdmd(cfg: RunConfig, backend) -> Method:
    if cfg.method.stage == 1:
        return AcDmdMethod(cfg, backend, options=cfg.method.stage1)
    if cfg.method.stage == 0:
        raise UserError("a two-stage rtdmd config runs through rtdmd.api.run_training (or the CLI), which trains "
                        "stage 1 then stage 2; to build one stage's method set method.stage to 1 or 2.")
    return RtdmdMethod(cfg, backend)
