"""The processes of an evaluation: rank, world size and barriers under accelerate or torchrun, one process otherwise."""

from __future__ import annotations

import torch
import torch.distributed as dist
from accelerate import PartialState

from rtdmd.distributed import inside_launch
from rtdmd.errors import UserError


class Processes:
    """Rank / world / barrier under accelerate or torchrun; one process otherwise."""

    def __init__(self, cpu: bool = False):
        self.state = None
        self.rank, self.world = 0, 1
        if inside_launch():
            # CPU processes (gloo) only form a group when accelerate is told they are CPU processes
            self.state = PartialState(cpu=cpu or not torch.cuda.is_available())
            self.rank, self.world = self.state.process_index, self.state.num_processes

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> str:
        if requested != "auto":
            return requested
        if self.state is not None:
            return str(self.state.device)
        return "cuda" if torch.cuda.is_available() else "cpu"

    def barrier(self) -> None:
        if self.world > 1:
            self.state.wait_for_everyone()

    def agree(self, error: BaseException | None) -> None:
        """Raise on every rank if rank 0 failed (so no rank waits forever at the next barrier)."""
        if self.world > 1:
            box = [None if error is None else f"{type(error).__name__}: {error}"]
            dist.broadcast_object_list(box, src=0)
            if error is None and box[0] is not None:
                raise UserError(f"rank 0 failed ({box[0]}); see its message above.")
        if error is not None:
            raise error
