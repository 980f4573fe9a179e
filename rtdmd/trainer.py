"""One training loop for every method.

Owns: devices and processes (accelerate), one AdamW per trained network with its own update
ratio, gradient accumulation over micro-batches (train.accumulate), EMA copies (updated on the network's
own steps or after every iteration, with an optional warm-up: train.ema_on, ema_warmup,
ema_per_micro_batch; docs/paper.md s4b), gradient clipping, mixed precision, atomic verified checkpoints every N steps,
exact resume (from the newest checkpoint or, with --resume-from, an earlier one), MLflow logging
and the progress bar. Methods (rtdmd.methods.base.Method) only compute losses. A run holds a lock
on its directory (rtdmd.runlock), so a second run there is refused; Ctrl-C and SIGTERM stop it at
the next step boundary with a checkpoint.

Exact resume: every random draw of step ``i`` comes from generators derived from
(train.seed, i), and a checkpoint holds weights, EMA copies and optimiser moments, so an
interrupted-and-resumed run repeats the uninterrupted one step for step (on CPU).
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from tqdm import tqdm

from rtdmd import checkpoint as ckpt
from rtdmd import registry
from rtdmd.config import RunConfig, config_to_dict, dump, flatten, load_resolved, scheduled_lr
from rtdmd.ema import ema_decay_at, ema_update
from rtdmd.errors import NonFiniteLossError, UserError
from rtdmd.methods.base import Method, StepContext
from rtdmd.runlock import DirLock
from rtdmd.seeding import derive_seed, step_seed, torch_generator
from rtdmd.signals import DeferredSignals
from rtdmd.tracking import LogWindow, Tracker, git_commit


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    steps: int
    seconds: float
    last_logs: dict


@dataclass
class _Progress:
    """Where a run stands: its first and last step, the steps done, the newest checkpoint and the time used."""

    start: int
    total: int
    elapsed: float  # seconds trained before this process (resumes)
    run_id: str | None
    t0: float = 0.0
    step: int = 0
    completed: int = 0  # every update of steps < completed is applied
    last_ckpt: Path | None = None
    logs: dict = field(default_factory=dict)
    at_boundary: bool = False

    def __post_init__(self):
        self.step = self.completed = self.start

    def seconds(self) -> float:
        return self.elapsed + time.perf_counter() - self.t0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device is '{name}' but no CUDA device is visible; set train.device=cpu or auto.")
    return torch.device(name)


def _init_seconds(cfg, key: str = "train_seconds") -> float:
    """Training time already in the weights a run starts from (``method.init``: RTDMD stage 2 from stage 1,
    Flow-GRPO on a distilled generator), so a checkpoint's train_seconds (and train_cpu_seconds) is the whole
    cost of its weights and methods compare at equal total cost in reports."""
    init = getattr(cfg.method, "init", "")
    if not init:
        return 0.0
    try:
        return float(ckpt.read_meta(ckpt.find_checkpoint(init)).get(key) or 0.0)
    except (UserError, OSError, ValueError):
        return 0.0


def _changed_keys(saved: dict, now: dict, ignore_prefixes=("train.max_steps", "train.max_minutes", "tracking.", "train.num_threads",
                                                          "train.checkpoint_every", "train.log_every", "train.diagnostics",
                                                          "train.keep_checkpoints", "train.device")) -> list[str]:
    a, b = flatten(saved), flatten(now)
    keys = sorted(set(a) | set(b))
    # learning rates and clipping may change on resume: the NaN-loss advice is "lower the lr, then --resume"
    return [k for k in keys if a.get(k) != b.get(k) and not any(k.startswith(p) for p in ignore_prefixes)
            and not k.endswith(".lr") and k != "train.grad_clip"]


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path, resume: bool = False, command: str = "",
                 show_progress: bool = True, accelerator=None, resume_from: int | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self._init_seconds = _init_seconds(cfg)  # read once: the init checkpoint does not change during the run
        self._init_cpu_seconds = _init_seconds(cfg, "train_cpu_seconds")
        # CPU-seconds of this process's training (all its threads) plus those of earlier attempts (resume)
        self._cpu_before, self._cpu0 = 0.0, time.process_time()
        self.resume = resume or resume_from is not None
        self.resume_from = resume_from
        self.command = command
        self.show_progress = show_progress
        self._accelerator = accelerator

    # ------------------------------------------------------------------ setup
    def _setup(self):
        cfg = self.cfg
        if cfg.train.num_threads > 0:
            torch.set_num_threads(cfg.train.num_threads)
        device = resolve_device(cfg.train.device)
        if device.type == "cuda":  # TF32 matmuls: ~free speed on Ampere+ at fp32 master precision
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self._accelerator is None:
            self._accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=cfg.train.mixed_precision)
        acc = self._accelerator
        if cfg.train.batch_size % acc.num_processes:
            raise UserError(f"train.batch_size={cfg.train.batch_size} is not divisible by the {acc.num_processes} processes; "
                            "choose a multiple of the process count.")
        # networks built from scratch (teacher, reward models, heads) start from the same weights in every run
        torch.manual_seed(derive_seed(cfg.train.seed, "init"))
        backend = registry.get_backend(cfg.backend_name).factory(cfg.backend, acc.device)
        method: Method = registry.get_method(cfg.method_name).factory(cfg, backend)
        self.backend, self.method = backend, method
        if cfg.train.accumulate > 1 and not method.accumulates:
            raise UserError(f"method '{cfg.method_name}' does not split its batch into micro-batches, so "
                            f"train.accumulate={cfg.train.accumulate} cannot apply; set train.accumulate=1 and raise train.batch_size.")
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.emas: dict[str, nn.Module] = {}
        for u in method.updates:
            net = method.networks[u.network]
            params = list(backend.trainable_parameters(net))
            if not params:
                raise RuntimeError(f"network '{u.network}' of method '{cfg.method_name}' has no trainable parameters")
            o = u.optim
            impl = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[cfg.train.adamw_impl]
            self.optimizers[u.network] = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas),
                                                           weight_decay=o.weight_decay, eps=o.eps, **impl)
            if u.ema_decay is not None:
                self.emas[u.network] = copy.deepcopy(net).requires_grad_(False).eval()
        if cfg.train.compile:  # opt-in: compiled forwards (state dicts and EMA copies stay those of the modules)
            for net in [*method.networks.values(), *([] if "teacher" in method.networks else [backend.teacher])]:
                net.compile()
        # Wrap for devices / processes; methods then call the wrapped modules.
        for name in list(self.optimizers):
            net, opt = acc.prepare(method.networks[name], self.optimizers[name])
            method.networks[name], self.optimizers[name] = net, opt

    def _training_state(self, step: int, elapsed: float, run_id: str | None) -> dict:
        acc = self._accelerator
        tensors = {}
        for name, net in self.method.networks.items():
            if name in self.optimizers:
                tensors[f"net_{name}"] = dict(self.backend.network_state(acc.unwrap_model(net)))
        for name, ema in self.emas.items():
            tensors[f"ema_{name}"] = dict(self.backend.network_state(ema))
        objects = {
            "step": step,
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "method": self.method.state_dict(),
            "elapsed_seconds": elapsed,
            "cpu_seconds": self._cpu_seconds(),
            "mlflow_run_id": run_id,
        }
        return {"tensors": tensors, "objects": objects}

    def _inference_state(self) -> dict:
        name = self.method.inference_network
        net = self.emas.get(name) or self._accelerator.unwrap_model(self.method.networks[name])
        return dict(self.backend.network_state(net))

    def _save(self, step: int, elapsed: float, run_id: str | None) -> Path:
        if not self._accelerator.is_main_process:
            return self.run_dir / "checkpoints" / f"step_{step:06d}"
        return ckpt.write_checkpoint(
            self.run_dir, step,
            config_yaml=dump(self.cfg),
            sampler=self.method.sampler(),
            method=self.cfg.method_name,
            backend=self.cfg.backend_name,
            inference_state=self._inference_state(),
            training_state=self._training_state(step, elapsed, run_id),
            keep=self.cfg.train.keep_checkpoints,
            extra_meta={"role": self.method.inference_role(), "inference_network": self.method.inference_network,
                        "train_seconds": round(elapsed + self._init_seconds, 2),
                        "run_train_seconds": round(elapsed, 2),
                        "train_cpu_seconds": round(self._cpu_seconds() + self._init_cpu_seconds, 2),
                        "run_train_cpu_seconds": round(self._cpu_seconds(), 2),
                        "git_commit": git_commit(), "mlflow_run_id": run_id},
        )

    def _cpu_seconds(self) -> float:
        return self._cpu_before + time.process_time() - self._cpu0

    def _restore(self) -> tuple[int, float, str | None]:
        step_dir = ckpt.find_checkpoint(self.run_dir, step=self.resume_from)
        state = ckpt.load_training_state(step_dir)  # every file verified before any is read
        saved_cfg = load_resolved(step_dir / "config.yaml")
        changed = _changed_keys(config_to_dict(saved_cfg), config_to_dict(self.cfg))
        if changed:
            raise UserError(f"--resume found a checkpoint trained with a different config (first difference: '{changed[0]}'); "
                            "resume with the same config or start a new --out directory.")
        self._check_complete(step_dir, state)
        acc = self._accelerator
        for name, net in self.method.networks.items():
            if f"net_{name}" in state["tensors"]:
                self.backend.load_network_state(acc.unwrap_model(net), state["tensors"][f"net_{name}"])
        for name, ema in self.emas.items():
            self.backend.load_network_state(ema, state["tensors"][f"ema_{name}"])
        lrs = {u.network: u.optim.lr for u in self.method.updates}
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["objects"]["optimizers"][name])
            for group in opt.param_groups:  # load_state_dict restores the saved lr; the config's lr wins
                group["lr"] = lrs[name]
        self.method.load_state_dict(state["objects"].get("method", {}))
        o = state["objects"]
        self._cpu_before = float(o.get("cpu_seconds", 0.0))
        if self.resume_from is not None and acc.is_main_process:  # a later --resume continues from here too
            ckpt.point_latest(self.run_dir / "checkpoints", step_dir.name)
        return int(o["step"]), float(o.get("elapsed_seconds", 0.0)), o.get("mlflow_run_id")

    def _check_complete(self, step_dir: Path, state: dict) -> None:
        """Every trained network, EMA copy and optimiser of this method is in the checkpoint."""
        objects = state["objects"] if isinstance(state["objects"], dict) else {}
        need = [f"state/net_{n}.safetensors" for n in self.optimizers if f"net_{n}" not in state["tensors"]]
        need += [f"state/ema_{n}.safetensors" for n in self.emas if f"ema_{n}" not in state["tensors"]]
        if "step" not in objects or not all(n in objects.get("optimizers", {}) for n in self.optimizers):
            need.append(f"state/{ckpt.TRAINER_FILE} (step or optimiser state)")
        if need:
            raise UserError(f"checkpoint {step_dir} is incomplete ({need[0]} is missing); {ckpt.EARLIER}.")

    # ------------------------------------------------------------------ loop
    def run(self) -> TrainResult:
        self._setup()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        main = self._accelerator.is_main_process  # one lock per run, held by the process that writes
        with DirLock(self.run_dir, what="the training run of") if main else contextlib.nullcontext():
            return self._run_locked()

    def _begin(self) -> _Progress:
        """Restore (--resume) or check the directory is free; write the run's config; start MLflow."""
        cfg, acc = self.cfg, self._accelerator
        start, elapsed, run_id = 0, 0.0, None
        if acc.is_main_process:
            ckpt.clean_stale_tmp(self.run_dir / "checkpoints")
        has_ckpt = (self.run_dir / "checkpoints" / "latest").is_file()
        if self.resume:
            if not has_ckpt and self.resume_from is None:
                ckpt.require_checkpoint(self.run_dir)
            start, elapsed, run_id = self._restore()
        elif has_ckpt:
            raise UserError(f"{self.run_dir} already holds a training run; pass --resume to continue it or choose another --out.")
        if acc.is_main_process:
            (self.run_dir / "config.yaml").write_text(dump(cfg))
            if self.command:
                (self.run_dir / "command.txt").write_text(self.command + "\n")
        return _Progress(start=start, total=cfg.train.max_steps, elapsed=elapsed, run_id=run_id)

    def _start_tracker(self, p: _Progress) -> Tracker:
        cfg, acc = self.cfg, self._accelerator
        tracker = Tracker(cfg.tracking.enabled and acc.is_main_process, cfg.tracking.uri, cfg.tracking.experiment)
        tags = {"method": cfg.method_name, "backend": cfg.backend_name, "git_commit": git_commit(),
                "kind": "train", "run_dir": str(self.run_dir.resolve()), "command": self.command[:5000], **cfg.tracking.tags}
        p.run_id = tracker.start(cfg.tracking.run_name or f"train-{cfg.method_name}-{cfg.backend_name}", tags,
                                 flatten(config_to_dict(cfg)), run_id=p.run_id)
        if p.start == 0:
            tracker.log_artifact(self.run_dir / "config.yaml")
        return tracker

    def _progress_bar(self, p: _Progress):
        if not (self.show_progress and self._accelerator.is_main_process):
            return None
        return tqdm(total=p.total, initial=p.start, desc=f"train {self.cfg.method_name}", dynamic_ncols=True,
                    file=sys.stderr, unit="it")

    def _run_locked(self) -> TrainResult:
        p = self._begin()
        tracker = self._start_tracker(p)
        bar = self._progress_bar(p)
        p.t0, self._cpu0 = time.perf_counter(), time.process_time()
        status = "FAILED"
        signals = DeferredSignals()
        try:
            with signals:
                self._loop(p, tracker, bar, signals)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise self._interrupted(p) from None
        except NonFiniteLossError as exc:
            raise self._non_finite(p, exc) from None
        finally:
            if bar is not None:
                bar.close()
            self.method.close()
            tracker.end(status)
        if p.last_ckpt is None:
            p.last_ckpt = ckpt.find_checkpoint(self.run_dir)
        return TrainResult(self.run_dir, p.last_ckpt, p.total, p.seconds(), p.logs)

    def _loop(self, p: _Progress, tracker: Tracker, bar, signals: DeferredSignals) -> None:
        cfg = self.cfg
        if 0 < p.start < p.total and self._out_of_time(p.t0, p.elapsed):  # a resumed run that already used its budget
            p.total = p.start
            self._say(f"train.max_minutes={cfg.train.max_minutes} was already used by this run ({p.elapsed / 60:.1f} min "
                      f"at step {p.start}); raise it with --set train.max_minutes=... to continue.", bar)
        window = LogWindow()
        for step in range(p.start, p.total):
            p.step = step
            logged = (step + 1) % cfg.train.log_every == 0 or step + 1 == p.total
            p.logs = self._one_step(step, diagnose=cfg.train.diagnostics and logged)
            window.add(p.logs)
            done = p.completed = step + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in p.logs.items() if k.startswith("loss")}, refresh=False)
            if logged:
                tracker.log_metrics(window.means(), step=done)
            out_of_time = self._out_of_time(p.t0, p.elapsed)
            if done % cfg.train.checkpoint_every == 0 or done == p.total or out_of_time:
                p.last_ckpt = self._save(done, p.seconds(), p.run_id)
            if self._shared_flag(bool(signals.received)):
                p.at_boundary = True
                raise KeyboardInterrupt
            if out_of_time:
                p.total = done
                self._say(f"train.max_minutes={cfg.train.max_minutes} reached at step {done}; "
                          "continue later with --resume and a larger budget.", bar)
                break

    def _interrupted(self, p: _Progress) -> UserError:
        """Ctrl-C / SIGTERM: at a step boundary, checkpoint the last finished step; a second one stops at once."""
        if not p.at_boundary:
            return UserError("training stopped at once by a second interrupt (Ctrl-C or SIGTERM) without saving (the "
                             "last checkpoint is kept); continue with the same command and --resume.")
        if p.completed > p.start and (p.last_ckpt is None or p.last_ckpt.name != f"step_{p.completed:06d}"):
            p.last_ckpt = self._save(p.completed, p.seconds(), p.run_id)
        where = f"checkpoint written to {p.last_ckpt}" if p.last_ckpt else "no step finished since the last checkpoint"
        return UserError(f"training interrupted at step {p.completed}; {where}; "
                         "continue with the same command and --resume.")

    def _non_finite(self, p: _Progress, exc: NonFiniteLossError) -> NonFiniteLossError:
        """A NaN loss: save the state before the bad step (if its weights are finite) and say what to do."""
        done = p.step
        if done > p.start and self._weights_finite():  # parameters are still those before the bad step
            p.last_ckpt = self._save(done, p.seconds(), p.run_id)
        where = f"last good state saved to {p.last_ckpt}" if p.last_ckpt else "no checkpoint was written"
        return NonFiniteLossError(f"{exc} at step {done + 1} ({where}); lower that network's learning rate "
                                  "(--set method.<optim>.lr=...) or train.grad_clip and --resume, or start over if the "
                                  "weights had already diverged.")

    def _weights_finite(self) -> bool:
        nets = [self._accelerator.unwrap_model(self.method.networks[n]) for n in self.optimizers]
        return all(bool(torch.isfinite(t).all()) for net in [*nets, *self.emas.values()]
                   for t in net.parameters() if t.is_floating_point())

    def _shared_flag(self, flag: bool) -> bool:
        """True on every process when it is True on any (all processes stop at the same step)."""
        acc = self._accelerator
        if acc.num_processes == 1:
            return flag
        return bool(acc.reduce(torch.tensor([float(flag)], device=acc.device), reduction="sum").item() > 0)

    @staticmethod
    def _say(msg: str, bar) -> None:
        bar.write(msg) if bar is not None else print(msg, file=sys.stderr)

    def _out_of_time(self, t0: float, elapsed: float) -> bool:
        """train.max_minutes reached by this run (``elapsed`` seconds before this process, plus this process's);
        decided by rank 0 and shared, so all processes stop at the same step."""
        limit = self.cfg.train.max_minutes
        if limit <= 0:
            return False
        acc = self._accelerator
        used = (elapsed + time.perf_counter() - t0) / 60
        flag = torch.tensor([float(used >= limit and acc.is_main_process)], device=acc.device)
        if acc.num_processes > 1:
            flag = acc.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)

    def _one_step(self, step: int, diagnose: bool = False) -> dict[str, float]:
        cfg, acc, method = self.cfg, self._accelerator, self.method
        seed = step_seed(cfg.train.seed, step)
        ctx = StepContext(step=step, generator=torch_generator(seed), seed=seed, rank=acc.process_index,
                          world_size=acc.num_processes, micro_batches=cfg.train.accumulate, diagnose=diagnose)
        method.before_step(ctx)
        logs: dict[str, float] = {}
        for u in method.updates:
            if step % u.every:
                continue
            net = method.networks[u.network]
            net.train()
            loss_sum, extra = self._accumulate(u.network, net, ctx)
            if cfg.train.grad_clip > 0:
                gn = acc.clip_grad_norm_(list(self.backend.trainable_parameters(net)), cfg.train.grad_clip)
                logs[f"grad_norm/{u.network}"] = float(gn)
            for group in self.optimizers[u.network].param_groups:
                group["lr"] = scheduled_lr(u.optim, step, cfg.train.max_steps)
            self.optimizers[u.network].step()
            for opt in self.optimizers.values():
                opt.zero_grad(set_to_none=True)
            if cfg.train.ema_on == "update":
                self._ema(u, step)
            logs[f"loss/{u.network}"] = loss_sum
            logs.update(extra)
        if cfg.train.ema_on == "iteration":  # every EMA copy, whether or not its network stepped (docs/paper.md s4b)
            for u in method.updates:
                self._ema(u, step)
        logs.update(method.step_logs(ctx, logs))
        return logs

    def _accumulate(self, name: str, net: nn.Module, ctx: StepContext) -> tuple[float, dict[str, float]]:
        """Backward of ``name``'s loss over the step's train.accumulate micro-batches, each loss divided by their
        number (docs/paper.md s4b); the logged loss and scalars are the micro-batches' means."""
        acc, n = self._accelerator, self.cfg.train.accumulate
        total, extra = 0.0, {}
        for j in range(n):
            with acc.autocast():
                loss, logs = self.method.loss(name, ctx.micro_batch(j))
            if not torch.isfinite(loss.detach()).all():
                raise NonFiniteLossError(f"the loss of network '{name}' became {loss.item()}")
            acc.backward(loss / n if n > 1 else loss)
            total += float(loss.detach()) / n
            for k, v in logs.items():
                extra[k] = extra.get(k, 0.0) + float(v) / n
        return total, extra

    def _ema(self, u, step: int) -> None:
        """Update ``u``'s EMA copy at an EMA step (step % train.ema_every == 0): once, or once per micro-batch."""
        t = self.cfg.train
        if u.network not in self.emas or step % t.ema_every:
            return
        decay = ema_decay_at(step, u.ema_decay if u.ema_decay is not None else t.ema_decay, t.ema_warmup)
        net = self._accelerator.unwrap_model(self.method.networks[u.network])
        for _ in range(t.accumulate if t.ema_per_micro_batch else 1):
            ema_update(self.emas[u.network], net, decay)


def default_run_dir(cfg: RunConfig) -> Path:
    return Path("runs") / f"{cfg.method_name}-{cfg.backend_name}"


def resume_step(resume) -> int | None:
    """The STEP of ``resume=STEP`` (--resume-from STEP); None for True / False / "auto"."""
    return resume if isinstance(resume, int) and not isinstance(resume, bool) else None


def check_resume_from(cfg: RunConfig, resume) -> None:
    """--resume-from names a step of one run; a two-stage rtdmd run has two (one per stage directory)."""
    if resume_step(resume) is not None and getattr(cfg.method, "stage", None) == 0:
        raise UserError("--resume-from applies to one stage's run; pass --stage 1 or 2 with --out <run>/stage1 or "
                        "<run>/stage2 and --resume-from STEP.")
    if resume_step(resume) is not None and resume <= 0:
        raise UserError(f"--resume-from must be a positive step number, got {resume}.")


def train(cfg: RunConfig, out: Path | None = None, resume: bool | int = False, command: str = "",
          show_progress: bool = True) -> TrainResult:
    """Python API: train ``cfg`` into ``out`` (default runs/<method>-<backend>). ``resume``: True continues
    from the newest checkpoint, an int STEP from checkpoint STEP (--resume-from)."""
    run_dir = Path(out) if out is not None else default_run_dir(cfg)
    if not math.isfinite(cfg.train.max_steps) or cfg.train.max_steps <= 0:
        raise UserError("train.max_steps must be a positive integer; pass --max-steps N.")
    check_resume_from(cfg, resume)
    return Trainer(cfg, run_dir, resume=bool(resume), command=command, show_progress=show_progress,
                   resume_from=resume_step(resume)).run()
