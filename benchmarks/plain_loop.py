"""The loop a user would write instead of ``mixrank train``: one process, the same model and
rows, no DistributedModelParallel, no reader in the loop.

The rows are encoded once, up front, with the run's own schema (its vocabularies and hashing),
into a list of batches whose ``KeyedJaggedTensor``s are built before the clock starts; each
epoch steps through them in a shuffled order with ``torch.optim.Adam`` over every parameter
(the TorchRec tables' gradients included) and binary cross-entropy. For ``arch: dlrm`` the model
is TorchRec's own ``torchrec.models.dlrm.DLRM`` (``ranking.model.baselines`` only adds the
constant dense column when a schema has no dense features); for the mixers it is our module,
unsharded. ``mixrank bench train --vs-plain`` runs this beside ``mixrank train --nproc 1`` on
the same rows and prints the ratio of their training samples/s.

    python -m benchmarks.plain_loop --run-dir RUN --epochs 3
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path


def encode_once(cfg, batch_size: int) -> list:
    """Every full batch of ``cfg.data.train``, read and encoded by mixrank's reader (not
    timed), KJTs built."""
    from ranking.data.reader import ParquetBatches, resolve_files

    files = resolve_files(cfg.data.train, cfg.data.since, cfg.data.until)
    reader = ParquetBatches(
        cfg.schema, files, batch_size, rank=0, world_size=1, shuffle=False, drop_last=True
    )
    return list(reader)


def plain_loop(
    run_dir: str | Path, epochs: int = 3, batch_size: int | None = None, log_every: int = 50
) -> dict:
    """Train the model of ``<run_dir>/config.yaml`` (a ``mixrank train`` run directory: its
    config has the resolved vocabularies) with a plain loop; training samples/s as the median of
    ``log_every``-step windows, the first excluded (as ``mixrank bench train`` reads
    ``mixrank train``'s own log)."""
    import torch
    import torch.nn.functional as F

    from ranking.model.ranker import build_model
    from ranking.train.config import load_experiment

    cfg = load_experiment(Path(run_dir) / "config.yaml")
    bs = batch_size or cfg.data.batch_size
    torch.manual_seed(cfg.train.seed)
    batches = encode_once(cfg, bs)
    model = build_model(cfg.model, cfg.schema).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    rng = random.Random(cfg.train.seed)
    rates, loss_sum, n = [], 0.0, 0
    t_win, step = time.perf_counter(), 0
    for _ in range(epochs):
        order = list(range(len(batches)))
        rng.shuffle(order)
        for i in order:
            b = batches[i]
            out = model(b)
            loss = F.binary_cross_entropy_with_logits(out.logits.float(), b.labels)
            opt.zero_grad()
            (loss + out.aux_loss).backward()
            opt.step()
            loss_sum += loss.item()
            n += 1
            step += 1
            if step % log_every == 0:
                now = time.perf_counter()
                rates.append(log_every * bs / (now - t_win))
                t_win = now
    return {
        "samples_per_s": statistics.median(rates[1:] or rates),
        "steps": step,
        "loss": loss_sum / max(n, 1),
        "batches_per_epoch": len(batches),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True, help="a mixrank train run directory")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None)
    a = p.parse_args(argv)
    print(plain_loop(a.run_dir, a.epochs, a.batch_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
