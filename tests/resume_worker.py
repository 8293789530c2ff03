"""The training worker (``ranking.train.worker``) with fault points, for the resume tests.

Run under torchrun exactly like the worker (``--run-dir`` once or more). It adds, around the real
``Trainer.save`` and ``Trainer.try_resume``, and nothing else:

- ``MIXRANK_TEST_SNAPSHOT=1``: right after the first mid-epoch and the first epoch-boundary
  checkpoint of a run have been saved, the run directory is copied to ``<run>.snap-mid`` /
  ``<run>.snap-boundary`` (all ranks wait at a barrier, so nothing is written meanwhile). That
  copy is what the disk holds when a SIGKILL lands right after that checkpoint. Each rank also
  writes its whole in-memory training state of that moment (``expected-rank<r>.pt``) into it.
- ``MIXRANK_TEST_SIGKILL_AFTER=<step>``: right after checkpoint ``<step>`` is complete, the
  last rank sends itself SIGKILL (torchrun then stops the others).
- On resuming, where the run directory holds ``expected-rank<r>.pt``: the restored state is
  compared with it, key by key; the position resumed from and every mismatch are written to
  ``resume-diff-rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ranking.train import trainer as W
from ranking.train import worker


def _flat(obj, prefix: str, out: dict) -> dict:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(obj, dict):
        for k, v in obj.items():
            _flat(v, f"{prefix}{k}/", out)
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _flat(v, f"{prefix}{i}/", out)
    elif isinstance(obj, ShardedTensor):
        for j, s in enumerate(obj.local_shards()):
            out[f"{prefix}shard{j}"] = s.tensor.detach().clone()
    elif hasattr(obj, "to_local"):  # DTensor
        out[prefix] = obj.to_local().detach().clone()
    elif isinstance(obj, torch.Tensor):
        out[prefix] = obj.detach().clone()
    else:
        out[prefix] = obj
    return out


def training_state(t: W.Trainer, position: W.Position) -> dict:
    """Everything the loop carries from one step to the next, flattened to ``{key: value}``."""
    module = t.model.module
    groups = [
        {k: v for k, v in g.items() if k != "params"}
        for opt in (t.model.fused_optimizer, t.dense_opt)
        for g in opt.param_groups
    ]
    state = {
        "model": t.model.state_dict(),
        # non-persistent buffers are not in the state dict: a running statistic kept in one
        # would not be checkpointed. TorchRec's `_features_order_tensor` is no training state:
        # the permutation of the input's feature keys, built by the first forward.
        "buffers": {
            n: b for n, b in module.named_buffers() if not n.endswith("._features_order_tensor")
        },
        "optim": t.optimizer.state_dict(),
        "param_groups": groups,
        "scheduler": t.scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        "selection": dict(t.selection),
        "position": vars(position),
    }
    return _flat(state, "", {})


def diff(expected: dict, got: dict) -> list[str]:
    out = []
    for k in sorted(set(expected) | set(got)):
        if k not in got:
            out.append(f"{k}: not restored")
        elif k not in expected:
            out.append(f"{k}: not in the saved run's state")
        else:
            a, b = expected[k], got[k]
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
                    out.append(f"{k}: tensor differs")
            elif a != b:
                out.append(f"{k}: {a!r} != {b!r}")
    return out


def _total_steps(t: W.Trainer) -> int:
    if not hasattr(t, "_test_total"):
        epochs = range(t.cfg.train.epochs)
        t._test_total = t.cfg.train.max_steps or sum(t._steps_in_epoch(e) for e in epochs)
    return t._test_total


def install() -> None:
    snapshot = os.environ.get("MIXRANK_TEST_SNAPSHOT") == "1"
    kill_after = int(os.environ.get("MIXRANK_TEST_SIGKILL_AFTER", "0") or 0)
    real_save, real_resume = W.Trainer.save, W.Trainer.try_resume

    def save(self, step, epoch, batch_in_epoch, metrics=None, stopped_early=False):
        path = real_save(self, step, epoch, batch_in_epoch, metrics, stopped_early)
        final = stopped_early or step == _total_steps(self)
        if snapshot and not final:
            in_epoch = self._steps_in_epoch(epoch)
            kind = "boundary" if batch_in_epoch == in_epoch else "mid"
            taken = self.__dict__.setdefault("_test_snaps", set())
            if kind not in taken:
                taken.add(kind)
                snap = Path(f"{self.run_dir}.snap-{kind}")
                if self.rank == 0:
                    shutil.rmtree(snap, ignore_errors=True)
                    shutil.copytree(self.run_dir, snap)
                dist.barrier()
                pos = W.Position(step, epoch, batch_in_epoch, metrics or {}, stopped_early)
                torch.save(training_state(self, pos), snap / f"expected-rank{self.rank}.pt")
                dist.barrier()
        if kill_after and step == kill_after:
            dist.barrier()
            if self.rank == self.world - 1:
                os.kill(os.getpid(), signal.SIGKILL)
        return path

    def try_resume(self):
        pos = real_resume(self)
        expected = self.run_dir / f"expected-rank{self.rank}.pt"
        if expected.is_file():
            got = training_state(self, pos)
            want = torch.load(expected, weights_only=False)
            report = self.run_dir / f"resume-diff-rank{self.rank}.json"
            report.write_text(json.dumps({"position": vars(pos), "diffs": diff(want, got)}))
        return pos

    W.Trainer.save, W.Trainer.try_resume = save, try_resume


def launch(run_dirs: list[Path], env: dict, timeout: int):
    """This worker under torchrun (2 ranks, one thread each) over ``run_dirs``."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1"]
    cmd += ["--nproc-per-node=2", "--max-restarts=0", __file__]
    for r in run_dirs:
        cmd += ["--run-dir", str(r)]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
    )


if __name__ == "__main__":
    install()
    sys.exit(worker.main())
