"""Process-group awareness: one code path for 1 or N processes launched by torchrun."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def all_sums(self, values: dict[str, float]) -> dict[str, float]:
        """`all_sum` of every value, in one collective; every rank must pass the same keys."""
        if self.world == 1 or not values:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(keys, t.tolist(), strict=True))

    @property
    def backend(self) -> str | None:
        return dist.get_backend() if dist.is_initialized() else None

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather_objects(self, obj: object) -> list[object]:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[object] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def setup(group: bool = False) -> Dist:
    """Join the process group if torchrun started us (WORLD_SIZE>1); otherwise a world of one.

    group: a process group even for one process (FSDP2 and DeepSpeed need one), on a free local port."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if (world > 1 or group) and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if world == 1 and "MASTER_ADDR" not in os.environ:  # not launched by torchrun: a group of one, here
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        else:
            dist.init_process_group(backend)
    return Dist(rank=rank, world=world, local_rank=local, device=device)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def teardown(d: Dist, ok: bool = True) -> None:
    """Leave the process group. The barrier (FSDP2/DDP ranks can abort at exit unless they meet) only after
    success: a rank leaving on an error, Ctrl-C or SIGTERM may have peers inside another collective, or dead,
    and a barrier there deadlocks until gloo's timeout (torchrun SIGKILLs after 30 s, losing the message)."""
    if dist.is_initialized():
        if ok:
            dist.barrier()
        dist.destroy_process_group()
