"""One training loop for every method.

Owns: devices and processes (accelerate), one AdamW per trained network with its own update
ratio, EMA copies, gradient clipping, mixed precision, atomic checkpoints every N steps,
exact resume, MLflow logging and the progress bar. Methods (rtdmd.methods.base.Method)
only compute losses.

Exact resume: every random draw of step ``i`` comes from generators derived from
(train.seed, i), and a checkpoint holds weights, EMA copies and optimiser moments, so an
interrupted-and-resumed run repeats the uninterrupted one step for step (on CPU).
"""

from __future__ import annotations

import copy
import math
import signal
import threading
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rtdmd import checkpoint as ckpt
from rtdmd import registry
from rtdmd.config import RunConfig, config_to_dict, dump, flatten, load_resolved, scheduled_lr
from rtdmd.errors import NonFiniteLossError, UserError
from rtdmd.methods.base import Method, StepContext
from rtdmd.seeding import derive_seed, step_seed, torch_generator
from rtdmd.tracking import Tracker, git_commit


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    steps: int
    seconds: float
    last_logs: dict


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device is '{name}' but no CUDA device is visible; set train.device=cpu or auto.")
    return torch.device(name)


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * net, on parameters; buffers are copied."""
    for pe, p in zip(ema.parameters(), net.parameters()):
        if p.requires_grad:
            pe.lerp_(p.detach(), 1.0 - decay)
    for be, b in zip(ema.buffers(), net.buffers()):
        be.copy_(b)


def _init_seconds(cfg) -> float:
    """Training time already in the weights a run starts from (``method.init``: RTDMD stage 2 from stage 1,
    Flow-GRPO on a distilled generator), so a checkpoint's train_seconds is the whole cost of its weights
    and methods compare at equal total cost in reports."""
    init = getattr(cfg.method, "init", "")
    if not init:
        return 0.0
    try:
        return float(ckpt.read_meta(ckpt.find_checkpoint(init)).get("train_seconds") or 0.0)
    except (UserError, OSError, ValueError):
        return 0.0


def _changed_keys(saved: dict, now: dict, ignore_prefixes=("train.max_steps", "train.max_minutes", "tracking.", "train.num_threads",
                                                          "train.checkpoint_every", "train.log_every",
                                                          "train.keep_checkpoints", "train.device")) -> list[str]:
    a, b = flatten(saved), flatten(now)
    keys = sorted(set(a) | set(b))
    # learning rates and clipping may change on resume: the NaN-loss advice is "lower the lr, then --resume"
    return [k for k in keys if a.get(k) != b.get(k) and not any(k.startswith(p) for p in ignore_prefixes)
            and not k.endswith(".lr") and k != "train.grad_clip"]


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path, resume: bool = False, command: str = "",
                 show_progress: bool = True, accelerator=None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self._init_seconds = _init_seconds(cfg)  # read once: the init checkpoint does not change during the run
        self.resume = resume
        self.command = command
        self.show_progress = show_progress
        self._accelerator = accelerator

    # ------------------------------------------------------------------ setup
    def _setup(self):
        from accelerate import Accelerator

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
            extra_meta={"role": self.method.inference_role(), "train_seconds": round(elapsed + self._init_seconds, 2),
                        "run_train_seconds": round(elapsed, 2),
                        "git_commit": git_commit(), "mlflow_run_id": run_id},
        )

    def _restore(self) -> tuple[int, float, str | None]:
        step_dir = ckpt.find_checkpoint(self.run_dir)
        saved_cfg = load_resolved(step_dir / "config.yaml")
        changed = _changed_keys(config_to_dict(saved_cfg), config_to_dict(self.cfg))
        if changed:
            raise UserError(f"--resume found a checkpoint trained with a different config (first difference: '{changed[0]}'); "
                            "resume with the same config or start a new --out directory.")
        state = ckpt.load_training_state(step_dir)
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
        return int(o["step"]), float(o.get("elapsed_seconds", 0.0)), o.get("mlflow_run_id")

    # ------------------------------------------------------------------ loop
    def run(self) -> TrainResult:
        self._setup()
        cfg, acc, method = self.cfg, self._accelerator, self.method
        self.run_dir.mkdir(parents=True, exist_ok=True)
        start, elapsed, run_id = 0, 0.0, None
        has_ckpt = (self.run_dir / "checkpoints" / "latest").is_file()
        if self.resume:
            if not has_ckpt:
                raise UserError(f"--resume given but {self.run_dir} holds no checkpoint; drop --resume to start a new run there.")
            start, elapsed, run_id = self._restore()
        elif has_ckpt:
            raise UserError(f"{self.run_dir} already holds a training run; pass --resume to continue it or choose another --out.")
        if acc.is_main_process:
            (self.run_dir / "config.yaml").write_text(dump(cfg))
            if self.command:
                (self.run_dir / "command.txt").write_text(self.command + "\n")
        tracker = Tracker(cfg.tracking.enabled and acc.is_main_process, cfg.tracking.uri, cfg.tracking.experiment)
        tags = {"method": cfg.method_name, "backend": cfg.backend_name, "git_commit": git_commit(),
                "kind": "train", "run_dir": str(self.run_dir.resolve()), "command": self.command[:5000]}
        run_id = tracker.start(cfg.tracking.run_name or f"train-{cfg.method_name}-{cfg.backend_name}", tags,
                               flatten(config_to_dict(cfg)), run_id=run_id)
        if start == 0:
            tracker.log_artifact(self.run_dir / "config.yaml")
        total = cfg.train.max_steps
        bar = None
        if self.show_progress and acc.is_main_process:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=start, desc=f"train {cfg.method_name}", dynamic_ncols=True,
                       file=sys.stderr, unit="it")
        logs: dict[str, float] = {}
        step = start
        last_ckpt = None
        t0 = time.perf_counter()
        status = "FAILED"
        # Ctrl-C is deferred to the end of the step (after its checkpoint, if any), so the state saved on an
        # interrupt is always a step boundary and --resume repeats the uninterrupted run; a second Ctrl-C stops at once.
        sigints: list[int] = []
        at_boundary = False

        def _defer(signum, frame):
            sigints.append(signum)
            if len(sigints) > 1:
                raise KeyboardInterrupt

        old_handler = signal.signal(signal.SIGINT, _defer) if threading.current_thread() is threading.main_thread() else None
        completed = start  # every update of steps < completed is applied
        if 0 < start < total and self._out_of_time(t0, elapsed):  # a resumed run that already used its budget
            total = start
            self._say(f"train.max_minutes={cfg.train.max_minutes} was already used by this run ({elapsed / 60:.1f} min "
                      f"at step {start}); raise it with --set train.max_minutes=... to continue.", bar)
        try:
            for step in range(start, total):
                logs = self._one_step(step)
                done = completed = step + 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k.startswith("loss")}, refresh=False)
                if done % cfg.train.log_every == 0 or done == total:
                    tracker.log_metrics(logs, step=done)
                out_of_time = self._out_of_time(t0, elapsed)
                if done % cfg.train.checkpoint_every == 0 or done == total or out_of_time:
                    last_ckpt = self._save(done, elapsed + time.perf_counter() - t0, run_id)
                if self._shared_flag(bool(sigints)):
                    at_boundary = True
                    raise KeyboardInterrupt
                if out_of_time:
                    total = done
                    self._say(f"train.max_minutes={cfg.train.max_minutes} reached at step {done}; "
                              "continue later with --resume and a larger budget.", bar)
                    break
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            if at_boundary:
                if completed > start and (last_ckpt is None or last_ckpt.name != f"step_{completed:06d}"):
                    last_ckpt = self._save(completed, elapsed + time.perf_counter() - t0, run_id)
                where = f"checkpoint written to {last_ckpt}" if last_ckpt else "no step finished since the last checkpoint"
                raise UserError(f"training interrupted at step {completed}; {where}; "
                                "continue with the same command and --resume.") from None
            raise UserError("training stopped at once by a second Ctrl-C without saving (the last checkpoint is kept); "
                            "continue with the same command and --resume.") from None
        except NonFiniteLossError as exc:
            done = step
            if done > start:  # parameters are still those before the bad step
                last_ckpt = self._save(done, elapsed + time.perf_counter() - t0, run_id)
            where = f"last good state saved to {last_ckpt}" if last_ckpt else "no checkpoint was written"
            raise NonFiniteLossError(f"{exc} at step {done + 1} ({where}); lower that network's learning rate "
                                     "(--set method.<optim>.lr=...) or train.grad_clip and --resume, or start over if the "
                                     "weights had already diverged.") from None
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
            if bar is not None:
                bar.close()
            method.close()
            tracker.end(status)
        seconds = elapsed + time.perf_counter() - t0
        if last_ckpt is None:
            last_ckpt = ckpt.find_checkpoint(self.run_dir)
        return TrainResult(self.run_dir, last_ckpt, total, seconds, logs)

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

    def _one_step(self, step: int) -> dict[str, float]:
        cfg, acc, method = self.cfg, self._accelerator, self.method
        seed = step_seed(cfg.train.seed, step)
        ctx = StepContext(step=step, generator=torch_generator(seed), seed=seed,
                          rank=acc.process_index, world_size=acc.num_processes)
        method.before_step(ctx)
        logs: dict[str, float] = {}
        for u in method.updates:
            if step % u.every:
                continue
            net = method.networks[u.network]
            net.train()
            with acc.autocast():
                loss, extra = method.loss(u.network, ctx)
            if not torch.isfinite(loss.detach()).all():
                raise NonFiniteLossError(f"the loss of network '{u.network}' became {loss.item()}")
            acc.backward(loss)
            if cfg.train.grad_clip > 0:
                gn = acc.clip_grad_norm_(list(self.backend.trainable_parameters(net)), cfg.train.grad_clip)
                logs[f"grad_norm/{u.network}"] = float(gn)
            for group in self.optimizers[u.network].param_groups:
                group["lr"] = scheduled_lr(u.optim, step, cfg.train.max_steps)
            self.optimizers[u.network].step()
            for opt in self.optimizers.values():
                opt.zero_grad(set_to_none=True)
            if u.network in self.emas and step % cfg.train.ema_every == 0:
                decay = u.ema_decay if u.ema_decay is not None else cfg.train.ema_decay
                ema_update(self.emas[u.network], acc.unwrap_model(net), decay)
            logs[f"loss/{u.network}"] = float(loss.detach())
            logs.update(extra)
        return logs


def default_run_dir(cfg: RunConfig) -> Path:
    return Path("runs") / f"{cfg.method_name}-{cfg.backend_name}"


def train(cfg: RunConfig, out: Path | None = None, resume: bool = False, command: str = "",
          show_progress: bool = True) -> TrainResult:
    """Python API: train ``cfg`` into ``out`` (default runs/<method>-<backend>)."""
    run_dir = Path(out) if out is not None else default_run_dir(cfg)
    if not math.isfinite(cfg.train.max_steps) or cfg.train.max_steps <= 0:
        raise UserError("train.max_steps must be a positive integer; pass --max-steps N.")
    return Trainer(cfg, run_dir, resume=resume, command=command, show_progress=show_progress).run()
