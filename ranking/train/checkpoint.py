"""Atomic, sharded training checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout of ``<run>/checkpoints/``::

    step-00000400/            # DCP files of every rank (sharded tables stay sharded)
        .metadata, __0_0.distcp, ...
        COMPLETE              # written by rank 0 after every rank finished; JSON with the step
    step-00000800.partial/    # a save in progress (or killed half way): never loaded

A save writes into ``step-N.partial/``; after a barrier rank 0 writes ``COMPLETE`` into it and
renames it to ``step-N/``. ``latest()`` only returns directories that have the marker, so a
checkpoint killed half way is skipped. The newest ``keep`` complete checkpoints are kept.

A save that fails (no space left, no permission, on any rank) raises
:class:`CheckpointWriteError` on every rank that sees it, naming the checkpoint, the cause and
the newest complete checkpoint, which stays the newest: the partial directory is removed (or,
where even that fails, left without its marker, which ``latest()`` never takes).

``MIXRANK_FAULT_CHECKPOINT=<step>[:<errno name>]`` makes DCP's file writer fail with that
error (default ``ENOSPC``) while writing checkpoint ``<step>``: a fault-injecting storage path
for tests of the above with real torchrun; nothing reads it otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from ranking.errors import UserError

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def complete_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    out = []
    for p in ckpt_dir.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / MARKER).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest(ckpt_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    done = complete_checkpoints(ckpt_dir)
    return done[-1][1] if done else None


def read_marker(path: str | Path) -> dict:
    return json.loads((Path(path) / MARKER).read_text())


def save(
    state: dict,
    ckpt_dir: str | Path,
    step: int,
    keep: int = 2,
    info: dict | None = None,
    local: dict | None = None,
) -> Path:
    """Save ``state`` (a DCP state dict) from every rank as checkpoint ``step``; returns its path.

    ``local`` is this rank's own small state (RNG, data position), saved beside the DCP files as
    ``rank-<r>.pt``; DCP would treat plain tensors as replicated and keep only rank 0's copy.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"step-{step:08d}"
    partial = ckpt_dir / f"step-{step:08d}.partial"
    try:
        if _rank() == 0:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            if partial.exists():
                shutil.rmtree(partial)
    except OSError as e:
        raise _write_error(ckpt_dir, partial, step, e) from None
    _barrier()
    try:
        dcp.save(
            state,
            checkpoint_id=str(partial),
            storage_writer=_writer(partial, step),
            planner=_view_planner(),
        )
        if local is not None:
            torch.save(local, partial / f"rank-{_rank()}.pt")
    except (OSError, RuntimeError, CheckpointException) as e:
        # DCP gathers every rank's failure into a CheckpointException (a BaseException)
        raise _write_error(ckpt_dir, partial, step, _root_cause(e)) from None
    _barrier()
    if _rank() == 0:
        try:
            marker = {"step": step, "time": time.time(), **(info or {})}
            tmp = partial / (MARKER + ".tmp")
            tmp.write_text(json.dumps(marker))
            os.replace(tmp, partial / MARKER)
        except OSError as e:
            raise _write_error(ckpt_dir, partial, step, e) from None
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(ckpt_dir)
        _prune(ckpt_dir, keep)
    _barrier()
    return final


class CheckpointWriteError(UserError):
    """A checkpoint could not be written; the newest complete one is unchanged."""


def _write_error(ckpt_dir: Path, partial: Path, step: int, cause) -> CheckpointWriteError:
    """Remove what the failed save left (best effort: rank 0) and say what happened."""
    if _rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
    newest = latest(ckpt_dir)
    keeps = (
        f"the newest complete checkpoint is still {newest}"
        if newest
        else ("there is no complete checkpoint yet")
    )
    return CheckpointWriteError(
        f"{partial}: checkpoint of step {step} could not be written: {cause}; {keeps}"
    )


def _root_cause(e: BaseException) -> str:
    """The first rank's error inside DCP's ``CheckpointException`` (else ``e`` itself)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, err = sorted(failures.items())[0]
        exc = err[0] if isinstance(err, tuple) else err
        return f"{exc} (rank {rank})"
    return str(e) or type(e).__name__


def _writer(path: Path, step: int):
    """DCP's file-system writer; the fault-injecting one where ``MIXRANK_FAULT_CHECKPOINT``
    names this step (see the module docstring)."""
    from torch.distributed.checkpoint import FileSystemWriter

    fault = os.environ.get("MIXRANK_FAULT_CHECKPOINT", "")
    fault_step, _, name = fault.partition(":")
    if not fault or int(fault_step) != step:
        return FileSystemWriter(str(path))
    import errno

    code = getattr(errno, name or "ENOSPC")

    class FaultyWriter(FileSystemWriter):
        def write_data(self, plan, planner):
            raise OSError(code, os.strerror(code), str(path))

    return FaultyWriter(str(path))


def exact_storage(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or, where ``t`` is a contiguous CPU view into a larger storage, an alias
    of the same memory whose storage is exactly ``t``'s bytes (a slice of the storage: it
    keeps the original alive; nothing is copied)."""
    nbytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or not t.is_contiguous() or t.untyped_storage().nbytes() == nbytes:
        return t
    start = t.storage_offset() * t.element_size()
    own = t.untyped_storage()[start : start + nbytes]
    return torch.empty(0, dtype=t.dtype).set_(own, 0, t.shape, t.stride())


def _view_planner():
    """DCP's default save planner, handing the writer views into larger storages as
    ``exact_storage`` aliases. DCP's writer clones such a tensor so that ``torch.save`` does
    not write the whole storage; FBGEMM keeps every table of a group (and its optimiser
    state) in one buffer, so each table of a group would be copied whole at every save: the
    10^8-row table-wise run's rank 0 peaked at 13.8 GiB in its save (7.5 GiB training) for
    that copy. The alias is written as the clone would be (same bytes, same checkpoint)."""
    from torch.distributed.checkpoint import DefaultSavePlanner

    class ViewPlanner(DefaultSavePlanner):
        def transform_object(self, write_item, object):
            object = super().transform_object(write_item, object)
            return exact_storage(object) if isinstance(object, torch.Tensor) else object

    return ViewPlanner()


class CheckpointError(RuntimeError):
    """A checkpoint that does not match what loads it (a key on one side only)."""


def _strict_planner(path: Path):
    """DCP's default load planner, made strict in the direction DCP leaves open.

    DCP fails on a key of ``state`` missing from the checkpoint (``allow_partial_load=False``)
    but silently ignores a key of the checkpoint that ``state`` lacks: an optimiser whose lazy
    state was never created, a buffer renamed since the save. Resuming then goes on without
    that state and drifts from the uninterrupted run; here it is an error naming the key.
    """
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class StrictLoadPlanner(DefaultLoadPlanner):
        def create_global_plan(self, global_plan):
            # on the coordinator, with every rank's plan: a rank holds only the state of what
            # it owns (a table-wise table's optimiser state lives on one rank), so a key is
            # read when any rank reads it
            read = {item.dest_index.fqn for plan in global_plan for item in plan.items}
            unread = sorted(set(self.metadata.state_dict_metadata) - read)
            if unread:
                more = f" and {len(unread) - 5} more" if len(unread) > 5 else ""
                raise CheckpointError(
                    f"{path}: the checkpoint holds {', '.join(unread[:5])}{more}, which the "
                    f"state being restored does not have; resuming without it would not "
                    f"continue the saved run"
                )
            return super().create_global_plan(global_plan)

    return StrictLoadPlanner(allow_partial_load=False)


def load(state: dict, path: str | Path) -> dict:
    """Load checkpoint ``path`` into ``state`` in place (DCP reshards as needed); returns it.

    Strict both ways: every key of ``state`` must be in the checkpoint and every key of the
    checkpoint in ``state`` (:class:`CheckpointError` names the first ones otherwise)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    path = Path(path)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {MARKER} marker)")
    try:
        dcp.load(state, checkpoint_id=str(path), planner=_strict_planner(path))
    except CheckpointException as e:  # DCP wraps every rank's error: raise the first one
        for err in e.failures.values():
            exc = err[0] if isinstance(err, tuple) else err
            if isinstance(exc, CheckpointError | RuntimeError):
                raise CheckpointError(str(exc)) from e
        raise
    return state


def saved_keys(path: str | Path) -> set[str]:
    """The flattened keys (``optim.state.<param>.exp_avg``, ...) stored in checkpoint ``path``."""
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def load_local(path: str | Path) -> dict:
    """This rank's ``local`` state saved with the checkpoint (RNG, schedule)."""
    f = Path(path) / f"rank-{_rank()}.pt"
    if not f.is_file():
        raise CheckpointError(
            f"{f}: missing; this rank's RNG and schedule state cannot be restored, so the run "
            f"cannot continue exactly (resume from another checkpoint or start a new run)"
        )
    return torch.load(f, weights_only=True)


def _prune(ckpt_dir: Path, keep: int) -> None:
    done = complete_checkpoints(ckpt_dir)
    for _, p in done[: max(0, len(done) - max(keep, 1))]:
        shutil.rmtree(p, ignore_errors=True)
    for p in ckpt_dir.glob("step-*.partial"):
        shutil.rmtree(p, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def rng_state() -> dict:
    """This rank's RNG state (torch CPU, and CUDA where present), for exact resumption."""
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def mapped_reader(path: str | Path):
    """A DCP ``FileSystemReader`` for ``path`` that copies each saved tensor into its
    destination from a read-only memory map of the ``.distcp`` file instead of reading it whole
    into memory first.

    DCP's own reader ``torch.load``s every stored chunk (a rank's whole shard of a table: 3.2 GB
    for a 10^8 x 16 table row-wise over 2 ranks) into anonymous memory, then copies the part it
    needs; this one finds the chunk's bytes in the file (``torch.load(map_location="meta")``
    gives the tensor's layout and its record's offset, no data read) and copies from mapped
    file pages, a block of rows at a time (``_copy_mapped``), so loading a multi-GB table into a
    mapped artifact needs no multi-GB buffer and maps no more than a block of the source. Byte items and items saved through a transform (compression
    extensions) go through DCP's own reader as before. Written by hand: DCP has no reader
    option for this."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan
    from torch.distributed.checkpoint.utils import _create_file_view
    from torch.futures import Future

    class MappedReader(FileSystemReader):
        def read_data(self, plan, planner):
            mine, theirs = [], []
            for req in plan.items:
                md = self.storage_data[req.storage_index]
                direct = req.type != LoadItemType.BYTE_IO and not md.transform_descriptors
                (mine if direct else theirs).append(req)
            if theirs:
                super().read_data(LoadPlan(theirs, plan.storage_data, plan.planner_data), planner)
            for req in mine:
                md = self.storage_data[req.storage_index]
                file = Path(self.fs.concat_path(self.path, md.relative_path))
                with open(file, "rb") as stream:
                    meta = torch.load(
                        _create_file_view(stream, md.offset, md.length),
                        map_location="meta",
                        weights_only=True,
                    )
                start = md.offset + meta.untyped_storage()._checkpoint_offset
                target = planner.resolve_tensor(req).detach()
                if list(target.size()) != list(req.lengths):
                    raise AssertionError(
                        f"req {req.storage_index} mismatch sizes {target.size()} vs {req.lengths}"
                    )
                _copy_mapped(file, start, meta, req.storage_offsets, req.lengths, target)
                planner.commit_tensor(req, target)
            fut: Future = Future()
            fut.set_result(None)
            return fut

    return MappedReader(str(path))


_BLOCK_BYTES = 64 << 20  # the stretch of a saved tensor mapped at a time


def _map(file: Path, offset: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
    """``nbytes`` of ``file`` from ``offset`` as a read-only 1-D tensor (a private mapping;
    unmapped when the tensor is freed)."""
    import numpy as np

    if nbytes == 0:
        return torch.empty(0, dtype=dtype)
    raw = np.memmap(file, dtype=np.uint8, mode="r", offset=offset, shape=(nbytes,))
    with warnings.catch_warnings():  # read only: the buffer is not writable
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(raw, dtype=dtype)


def _copy_mapped(file: Path, start: int, meta: torch.Tensor, offsets, lengths, target) -> None:
    """``target`` <- the part (``offsets``, ``lengths`` per dimension) of the tensor saved at
    byte ``start`` of ``file`` (``meta``: its layout). A contiguous saved tensor is mapped
    ``_BLOCK_BYTES`` of rows at a time, each stretch unmapped once copied, so the process never
    maps more than a block of the source (its pages stay in the page cache); anything else is
    mapped whole."""
    from torch.distributed._shard._utils import narrow_tensor_by_index

    size = meta.element_size()
    if meta.dim() == 0 or not meta.is_contiguous() or meta.numel() == 0:
        words = meta.untyped_storage().nbytes() // size
        src = _map(file, start, words * size, meta.dtype)
        src = src.as_strided(meta.size(), meta.stride(), meta.storage_offset())
        target.copy_(narrow_tensor_by_index(src, offsets, lengths))
        return
    row = meta[0].numel()  # elements per row of dimension 0
    first, rows = offsets[0], lengths[0]
    block = max(1, _BLOCK_BYTES // (row * size))
    for b in range(first, first + rows, block):
        e = min(b + block, first + rows)
        at = start + (meta.storage_offset() + b * row) * size
        src = _map(file, at, (e - b) * row * size, meta.dtype).view(e - b, *meta.shape[1:])
        for d in range(1, meta.dim()):
            src = src.narrow(d, offsets[d], lengths[d])
        target[b - first : e - first].copy_(src)
        del src  # unmaps this stretch
