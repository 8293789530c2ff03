"""The process group of a training job, and how its ranks agree.

``init_distributed`` starts (or reuses) the group from torchrun's environment; ``all_ranks`` is
the one way the ranks agree on a flag: every rank must run the same number of steps and
evaluation batches and stop at the same step.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int, int, torch.device]:
    """Start the process group from torchrun's environment: gloo on CPU, nccl on CUDA. A worker
    that trains several runs (``--run-dir`` more than once) starts it once and reuses it."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local_rank, device
    if "MASTER_ADDR" not in os.environ:  # plain `python -m ranking.train.worker`
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return rank, world, local_rank, device


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_ranks(value: int, op: str, device: torch.device) -> int:
    """``value`` reduced over every rank: ``op`` is ``"max"`` (does any rank say so) or
    ``"sum"`` (how many ranks do)."""
    ops = {"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}
    flag = torch.tensor([int(value)], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=ops[op])
    return int(flag.item())
