"""Shared test fixtures.

Real benchmark data is read from ../shared/data (research-licensed, never committed); tests that
need it use the ``shared_data`` fixture and skip cleanly when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
def one_rank_trainer(tmp_path):
    """``probe(cfg, body) -> obj``: builds the trainer's own ``Trainer`` (DistributedModelParallel,
    one gloo rank) for the experiment dict ``cfg`` in a fresh interpreter, runs ``body`` (Python
    source that sees the trainer as ``t`` and assigns a JSON-able ``out``) and returns ``out``."""
    import json
    import subprocess
    import sys
    import textwrap

    import yaml

    def probe(cfg: dict, body: str):
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
        script = "\n".join([
            "import json, os",
            "from pathlib import Path",
            "os.environ.setdefault('WORLD_SIZE', '1')",
            "import ranking.train.config as c",
            "real = c.load_experiment",
            "c.load_experiment = lambda p: real(p, require_data=False)",
            "import ranking.train.trainer as w",
            "w.load_experiment = c.load_experiment",
            f"t = w.Trainer(Path({str(tmp_path)!r}))",
            textwrap.dedent(body),
            "print(json.dumps(out))",
            "import torch.distributed as dist",
            "dist.destroy_process_group()",
        ])  # fmt: skip
        proc = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    return probe
