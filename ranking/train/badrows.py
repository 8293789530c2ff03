"""Bad rows under ``data.on_bad_rows: skip``: counted per cause, limited per epoch.

The reader drops bad rows from the batches it cuts and tells each batch what it dropped
(``Batch.bad_rows``); ``BadRows`` adds them up on one rank, fails once the bad rows of an epoch
pass ``data.max_bad_fraction`` of the rows the rank reads in it, and is saved with every
checkpoint (a resumed run replays no data for the batches it skips, so the counts come back from
the checkpoint, and the summary of a resumed run equals the uninterrupted one's).
"""

from __future__ import annotations

from ranking.data.errors import DataError


class BadRows:
    """Per-cause counts of the rows one rank dropped.

    Args:
        max_fraction: the most bad rows an epoch may hold, as a fraction of the rank's rows.
        what: what is read (``data.train``, ``data.valid``), for the message.
    """

    def __init__(self, max_fraction: float, what: str = "data.train"):
        self.max_fraction = max_fraction
        self.what = what
        self.total: dict[str, int] = {}
        self.examples: dict[str, str] = {}
        self.epoch_bad = 0
        self.epoch = 0
        self.rows = 0

    def start_epoch(self, epoch: int, rows: int, resumed: bool = False) -> None:
        """Epoch ``epoch``, of which this rank reads ``rows`` rows; ``resumed``: continue the
        epoch's count restored from a checkpoint."""
        if not (resumed and epoch == self.epoch):
            self.epoch_bad = 0
        self.epoch, self.rows = epoch, rows

    def add(self, batch, rank: int = 0) -> None:
        """Count what ``batch`` dropped; ``DataError`` once the epoch's bad rows pass the limit."""
        if not batch.bad_rows:
            return
        for cause, n in batch.bad_rows.items():
            self.total[cause] = self.total.get(cause, 0) + n
            self.epoch_bad += n
        for cause, msg in batch.bad_examples.items():
            self.examples.setdefault(cause, msg)
        if self.epoch_bad > self.max_fraction * self.rows:
            first = next(iter(self.examples.values()), "")
            raise DataError(
                f"{self.what}: {self.epoch_bad} bad rows in epoch {self.epoch} on rank {rank}, "
                f"more than data.max_bad_fraction={self.max_fraction:g} of its {self.rows} rows "
                f"({counts_text(self.total)}); first: {first}"
            )

    def state_dict(self) -> dict:
        return {"total": dict(self.total), "epoch_bad": self.epoch_bad, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.total = {str(k): int(v) for k, v in state.get("total", {}).items()}
        self.epoch_bad = int(state.get("epoch_bad", 0))
        self.epoch = int(state.get("epoch", 0))


def counts_text(counts: dict[str, int]) -> str:
    """``{"label": 3, "dense": 1}`` -> ``"label 3, dense 1"``."""
    return ", ".join(f"{c} {n}" for c, n in sorted(counts.items())) or "none"


def merge_counts(per_rank: list[dict[str, int]]) -> dict[str, int]:
    """The per-cause counts of every rank, added up."""
    out: dict[str, int] = {}
    for counts in per_rank:
        for c, n in counts.items():
            out[c] = out.get(c, 0) + n
    return dict(sorted(out.items()))
