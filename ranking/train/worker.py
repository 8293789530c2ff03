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
import json
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from ranking.data.errors import DataError
from ranking.errors import UserError
from ranking.model.config import ConfigError
from ranking.train.trainer import Trainer

# Errors a rank reports as one line (bad data, a checkpoint that cannot be written or resumed,
# a config that does not fit the run): ``<run>/errors/rank-<r>.json``, exit status 2, no
# traceback. ``mixrank train`` prints the first one and exits 2 itself. Anything else is a bug
# and keeps its traceback (``record`` hands it to torchrun's failure summary).
REPORTED = (DataError, UserError, ConfigError)
ERRORS_DIR = "errors"


def report_error(run_dir: Path, e: BaseException) -> None:
    """Write this rank's one-line error for the launcher (atomically: it may be reading)."""
    rank = int(os.environ.get("RANK", "0"))
    out = Path(run_dir) / ERRORS_DIR
    out.mkdir(parents=True, exist_ok=True)
    rec = {"rank": rank, "time": time.time(), "type": type(e).__name__, "message": one_line(e)}
    tmp = out / f".rank-{rank}.json.tmp"
    tmp.write_text(json.dumps(rec))
    os.replace(tmp, out / f"rank-{rank}.json")


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line: an error raised in a DataLoader worker comes back
    wrapped with that worker's traceback, of which the last line is the message."""
    msg = str(e)
    if "Original Traceback" in msg:
        last = msg.strip().splitlines()[-1]
        msg = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(msg.split())


@record
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
    run_dir = args.run_dir[0]
    try:
        for run_dir in args.run_dir:
            trainer = Trainer(Path(run_dir))
            rc = trainer.run(release=True)  # the export runs beside no training state
            if rc:
                return rc
            del trainer  # free this run's model, optimiser state and DMP before the next
            gc.collect()
        return 0
    except REPORTED as e:
        report_error(Path(run_dir), e)
        if dist.is_initialized() and dist.get_world_size() > 1:
            # the other ranks wait in a collective that will not complete: leave without the
            # process group's teardown (which could wait for them); torchrun stops them
            sys.stderr.flush()
            os._exit(2)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
