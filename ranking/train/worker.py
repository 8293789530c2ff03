"""The per-rank training program that ``mixrank train`` starts under ``torchrun``.

Each rank reads the resolved experiment config from the run directory and runs the training loop
(``ranking.train.trainer.Trainer``): the model wrapped in TorchRec's
``DistributedModelParallel`` (embedding tables sharded by the planner, fused embedding
optimiser; dense part data-parallel), periodic evaluation over the whole validation set, atomic
checkpoints with ``torch.distributed.checkpoint``, resuming from the newest complete one, and the
serving artifact of the final step.

Run it through ``mixrank train`` (which validates the config before any process starts)::

    python -m torch.distributed.run --nproc-per-node 2 -m ranking.train.worker --run-dir DIR
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch.distributed as dist

from ranking.train.trainer import Trainer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--run-dir",
        required=True,
        action="append",
        help="a prepared run directory; given more than once, the runs train one after the "
        "other in this process group (the quality harness: one start of torchrun, Python and "
        "TorchRec for many runs instead of one per run)",
    )
    args = p.parse_args(argv)
    try:
        for run_dir in args.run_dir:
            trainer = Trainer(Path(run_dir))
            rc = trainer.run()
            if rc:
                return rc
            del trainer  # free this run's model, optimiser state and DMP before the next
            gc.collect()
        return 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
