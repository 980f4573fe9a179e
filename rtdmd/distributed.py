"""Multi-process training: launching, and sharing decisions across ranks.

Launch. ``rtdmd-bench train ... --num-processes N`` re-executes the same command under
``accelerate launch`` (GPUs; configs/accelerate/{ddp,fsdp}.yaml) or ``torch.distributed.run``
(CPU, gloo); the trainer's ``Accelerator`` then picks up the process group. ``spawn`` runs a
Python function on N local CPU processes (gloo), for tests and notebooks.

Shared decisions. The trainer builds ``StepContext.generator`` from (train.seed, step) alone,
so every rank draws the same numbers from it: the stop index k, the SubGRPO step subset and
the global batch's noise are identical everywhere as long as every rank draws the *global*
batch and keeps ``ctx.shard(n)`` rows. ``shared_generator`` gives an independent stream for
one decision; ``assert_same_on_all_ranks`` checks a value really is shared.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.multiprocessing as mp

from rtdmd.errors import UserError
from rtdmd.seeding import torch_generator

ACCELERATE_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "accelerate"
_LAUNCH_ENV = ("WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_LAUNCH")  # set inside a launched process


# ---------------------------------------------------------------------------- process layout


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def inside_launch() -> bool:
    """True in a process started by accelerate launch / torchrun / spawn (do not relaunch)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ


# ---------------------------------------------------------------------------- launching


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_config_path(name: str) -> Path:
    """'ddp' / 'fsdp' (shipped) or a path to an accelerate config file."""
    p = ACCELERATE_CONFIG_DIR / f"{name}.yaml" if name in ("ddp", "fsdp") else Path(name).expanduser()
    if not p.is_file():
        raise UserError(f"accelerate config '{name}' not found ({p}); use ddp, fsdp or the path of an accelerate "
                        "config file (accelerate config --config_file PATH writes one).")
    return p


def strip_option(argv: Sequence[str], option: str) -> list[str]:
    """argv without ``option VALUE`` / ``option=VALUE`` (so a relaunched command does not relaunch)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == option:
            skip = True
            continue
        if a.startswith(option + "="):
            continue
        out.append(a)
    return out


def launch_command(cli_args: Sequence[str], num_processes: int, accelerate_config: str = "ddp",
                   cpu: bool | None = None, port: int | None = None) -> list[str]:
    """The command that runs ``rtdmd-bench <cli_args>`` on ``num_processes`` local processes.

    GPUs: ``accelerate launch --config_file <cfg> --num_processes N -m rtdmd.cli ...``;
    CPU (or no CUDA): ``python -m torch.distributed.run --nproc_per_node N -m rtdmd.cli ...`` (gloo).
    """
    if num_processes < 2:
        raise UserError(f"--num-processes must be at least 2 to launch several processes (got {num_processes}).")
    args = strip_option(strip_option(list(cli_args), "--num-processes"), "--accelerate-config")
    cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    if cpu:
        if any(a == "--set" and b.startswith("train.device=cuda") for a, b in zip(args, args[1:])):
            raise UserError("train.device=cuda was asked for a CPU launch; drop it or run on a machine with GPUs.")
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_processes}",
                "-m", "rtdmd.cli", *args]
    n_gpu = torch.cuda.device_count()
    if num_processes > n_gpu:
        raise UserError(f"--num-processes {num_processes} exceeds the {n_gpu} visible GPUs; lower it or set "
                        "CUDA_VISIBLE_DEVICES.")
    cfg = accelerate_config_path(accelerate_config)
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg),
            "--num_processes", str(num_processes), "--main_process_port", str(port or free_port()),
            "-m", "rtdmd.cli", *args]


def relaunch(cli_args: Sequence[str], num_processes: int, accelerate_config: str = "ddp",
             cpu: bool | None = None) -> int:
    """Run ``rtdmd-bench <cli_args>`` on ``num_processes`` processes; returns the exit code."""
    cmd = launch_command(cli_args, num_processes, accelerate_config, cpu)
    env = dict(os.environ)
    if cpu or (cpu is None and not torch.cuda.is_available()):
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
    return subprocess.run(cmd, env=env).returncode


def _spawn_entry(local_rank: int, fn: Callable, args: tuple, world: int, port: int) -> None:
    os.environ.update({"RANK": str(local_rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    try:
        fn(*args)
        barrier()
    finally:
        shutdown()


def barrier() -> None:
    """Wait until every rank of this process group gets here (nothing outside one). Called by a finished rank before
    ``shutdown``: a rank that tears its group down while another still uses it can abort that one."""
    if is_distributed():
        torch.distributed.barrier()


def shutdown() -> None:
    """Destroy this process's process group, if any, before the interpreter exits.

    A gloo group left to interpreter teardown can abort the process ("terminate called without an active
    exception", SIGABRT) after its work is done, which turns a finished multi-process run into a failed launch.
    """
    if is_distributed():
        torch.distributed.destroy_process_group()


def spawn(fn: Callable, num_processes: int, args: tuple = ()) -> None:
    """Run ``fn(*args)`` on ``num_processes`` local CPU processes with the env a launcher would set.

    ``fn`` creates its process group itself (``Accelerator(cpu=True)`` or ``init_process_group('gloo')``).
    """
    mp.start_processes(_spawn_entry, args=(fn, tuple(args), num_processes, free_port()), nprocs=num_processes,
                       join=True, start_method="spawn")


# ---------------------------------------------------------------------------- collectives


def all_gather_tensor(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped per-rank tensors along dim 0 in rank order (identity on one process)."""
    if not is_distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (identity on one process)."""
    if not is_distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def _fingerprint(value: Any) -> bytes:
    if torch.is_tensor(value):
        value = value.detach().cpu().contiguous().numpy().tobytes()
    elif isinstance(value, torch.Generator):
        value = value.get_state().numpy().tobytes()
    elif not isinstance(value, bytes):
        value = pickle.dumps(value)
    return hashlib.sha256(value).digest()


def assert_same_on_all_ranks(value: Any, what: str) -> None:
    """Raise RuntimeError naming ``what`` when ranks disagree on ``value`` (tensor, generator or picklable)."""
    if not is_distributed():
        return
    mine = _fingerprint(value)
    every = [None] * world_size()
    torch.distributed.all_gather_object(every, mine)
    if any(f != every[0] for f in every):
        bad = [i for i, f in enumerate(every) if f != every[0]]
        raise RuntimeError(f"{what} differs across processes (ranks {bad} disagree with rank 0)")


def shared_generator(ctx, tag: str) -> torch.Generator:
    """An independent torch stream for one per-step decision, identical on every rank.

    Derived from (step seed, tag) only, so it neither depends on nor disturbs the draws made
    from ``ctx.generator``.
    """
    return torch_generator(ctx.seed, tag)
