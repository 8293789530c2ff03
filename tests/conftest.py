"""Shared test fixtures.

Real benchmark data is read from ../shared/data (research-licensed, never committed); tests that
need it use the ``shared_data`` fixture and skip cleanly when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Triton reads TRITON_INTERPRET once, when it is first imported, and torch.compile (the
# compiled-epilogue tests) imports it too. Choose the interpreter here, before any test module,
# as tests/test_kernels_*.py would, so that they run their Triton cases in this process whatever
# ran first (on a GPU run, MIXRANK_TEST_DEVICE=cuda, they compile the kernels instead).
if os.environ.get("MIXRANK_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MIXRANK_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data; skips the test when it is not there."""
    if not (SHARED_DATA / "README.md").exists():
        pytest.skip(f"shared benchmark data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def one_rank_trainer(tmp_path, monkeypatch):
    """``build(cfg[, run_dir]) -> Trainer``: the trainer's own ``Trainer`` (DistributedModelParallel,
    one gloo rank) built in this process from the experiment dict or YAML ``cfg`` (data paths
    needed only to run it).
    The process group, the thread count and the environment are restored afterwards."""
    import socket

    import torch
    import torch.distributed as dist

    from ranking.train.config import load_experiment
    from ranking.train.trainer import Trainer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    threads = torch.get_num_threads()

    def build(cfg: dict | Path, run_dir: Path | None = None) -> Trainer:
        return Trainer(run_dir or tmp_path, cfg=load_experiment(cfg, require_data=False))

    yield build
    if dist.is_initialized():
        dist.destroy_process_group()
    torch.set_num_threads(threads)
