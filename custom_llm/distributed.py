"""Running as one of several processes under torchrun (DistributedDataParallel).

    torchrun --nproc_per_node=2 train_llm.py ...        # 2 processes on this machine
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 --nproc_per_node=1 train_llm.py ...

Without torchrun everything here is a no-op for a single process.
"""

import contextlib
import os

import torch
import torch.distributed as dist

from custom_llm.errors import UserError


class Processes:
    """This process's place among the training processes (rank 0 asks, prints and writes)."""

    def __init__(self, device: str):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self.is_main = self.rank == 0
        self.device = device
        if self.world_size > 1:
            if device == "cuda":
                torch.cuda.set_device(self.local_rank)
                self.device = f"cuda:{self.local_rank}"
            dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")

    @property
    def device_type(self) -> str:
        """cuda or cpu, whatever the GPU's index."""
        return "cuda" if self.device.startswith("cuda") else "cpu"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def threads_per_process(self) -> int:
        """Share this machine's cores between the processes on it."""
        return max(1, (os.cpu_count() or 1) // self.local_world_size)

    def share_from_main(self, read, elsewhere=None):
        """read() on rank 0, its value on every rank: rank 0 alone reads the run's files, so the
        other machines need none of them. elsewhere: what the other ranks use instead of rank 0's
        value (sent only when they need it). When rank 0 fails with a UserError, every rank stops
        with one line."""
        if not self.distributed:
            return read()
        value, error = None, None
        if self.is_main:
            try:
                value = read()
            except UserError as err:
                error = err
        sent = None if elsewhere else value   # ranks that make their own value need none of rank 0's
        holder = [(sent, error and (str(error), error.exit_code))]
        dist.broadcast_object_list(holder, src=0)
        if error:
            raise error
        if holder[0][1]:
            message, exit_code = holder[0][1]
            raise UserError(f"training process 0 stopped ({message})", exit_code)
        if self.is_main:
            return value
        return elsewhere() if elsewhere else holder[0][0]

    def barrier(self):
        if self.distributed:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (e.g. filling a cache); the others run it after."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank says True (e.g. a Ctrl-C that reached only some)."""
        if not self.distributed:
            return flag
        tensor = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def mean(self, value: float) -> float:
        if not self.distributed:
            return value
        tensor = torch.tensor([value], device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.item() / self.world_size

    def close(self):
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
