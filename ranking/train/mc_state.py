"""The transient state of managed-collision modules, for exact resumption.

TorchRec's ``MCHManagedCollisionModule`` keeps its id mapping (sorted raw ids, their rows, the
policy's counts / last-access steps) and its step counter in persistent buffers, which travel in
the model's ``state_dict`` and so in DCP checkpoints. What it gathers *between* two evictions is
plain attributes and non-persistent buffers, outside the ``state_dict``:

* the ids seen since the last coalesce (``_history_accumulator`` up to
  ``_current_history_buffer_offset``) and their per-id history metadata (``_history_<name>``,
  e.g. the step each id was seen for the LRU policies), in buffers sized once, from the first
  training batch (``_input_history_buffer_size``: a later batch's ids past it are dropped);
* the eviction phase: ``_current_iter`` and ``_last_eviction_iter``, which a fresh module sets
  from the step counter on its first training step (``_last_eviction_iter = _current_iter``),
  so that, resumed mid-interval, it would coalesce ``eviction_interval`` steps after the resume
  instead of where the uninterrupted run does;
* evictions not yet consumed (``_evicted``, ``_evicted_emb_indices``: the rows whose weights the
  next forward resets). TorchRec consumes them in the forward that made them, so they are
  normally empty at a checkpoint; they are kept all the same.

A resumed module without these would admit ids from a shorter history at a shifted phase, and
the run would drift from the uninterrupted one (the resume matrix saw AUC 0.675 against 0.701 on
``configs/mc_stream.yaml``). :func:`capture` returns this rank's state of every MCH module of a
model (sharded or not: row-wise sharding gives each rank its own module for its id block) as a
dict of plain tensors / ints, saved with the rank's ``local`` checkpoint state
(``rank-<r>.pt``, written before the checkpoint's ``COMPLETE`` marker); :func:`restore` puts it
back after the ``state_dict`` was loaded. The trainer resumes only with the world size that
saved (each rank restores its own file: the id blocks, hence the modules, are per rank).

Exported artifacts do not need this: serving and evaluation run in eval mode, where the modules
never profile.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchrec.modules.mc_modules import MCHManagedCollisionModule

from ranking.errors import UserError

VERSION = 1


def modules(model: torch.nn.Module) -> dict[str, MCHManagedCollisionModule]:
    """Every MCH module of ``model`` (sharded or not), by its path in the model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MCHManagedCollisionModule)}


def capture(model: torch.nn.Module) -> dict:
    """This rank's transient state of every MCH module of ``model`` (``{}``: none)."""
    out = {}
    for name, m in modules(model).items():
        n = int(m._current_history_buffer_offset)
        size = int(m._input_history_buffer_size)
        st = {
            "current_iter": int(m._current_iter),
            "last_eviction_iter": int(m._last_eviction_iter),
            "history_size": size,
            "history_offset": n,
            "evicted": bool(m._evicted),
            "evicted_emb_indices": m._evicted_emb_indices.detach().cpu().clone(),
        }
        if size >= 0:
            st["history"] = m._history_accumulator[:n].detach().cpu().clone()
            st["history_metadata"] = {
                k: v[:n].detach().cpu().clone() for k, v in m._history_metadata.items()
            }
        out[name] = st
    return {"version": VERSION, "modules": out} if out else {}


def restore(model: torch.nn.Module, state: dict | None, source: str | Path) -> bool:
    """Put ``state`` (from :func:`capture`) back into the MCH modules of ``model``, whose
    ``state_dict`` was loaded from the same checkpoint. Returns False (nothing restored) where
    ``state`` is empty and the model has MCH modules: a checkpoint saved before this state was
    kept (the caller says that the resume is then approximate). Raises :class:`UserError`,
    naming ``source``, where the modules do not match the saved ones."""
    mods = modules(model)
    if not mods:
        return True
    if not state:
        return False
    saved = state.get("modules", {})
    if state.get("version") != VERSION or set(saved) != set(mods):
        raise UserError(
            f"{source}: its managed-collision state (version {state.get('version')}, modules "
            f"{sorted(saved)}) does not match this model's MCH modules {sorted(mods)}; "
            f"resuming would not continue the saved run"
        )
    for name, m in mods.items():
        st = saved[name]
        dev = m._mch_sorted_raw_ids.device
        size, n = int(st["history_size"]), int(st["history_offset"])
        if size >= 0:
            _history_buffers(m, size, dev)
            m._history_accumulator[:n] = st["history"].to(dev)
            if set(st["history_metadata"]) != set(m._history_metadata):
                raise UserError(
                    f"{source}: {name}: saved history metadata "
                    f"{sorted(st['history_metadata'])} but this module's eviction policy keeps "
                    f"{sorted(m._history_metadata)}"
                )
            for k, v in st["history_metadata"].items():
                m._history_metadata[k][:n] = v.to(dev)
        m._current_history_buffer_offset = n
        m._current_iter = int(st["current_iter"])
        m._last_eviction_iter = int(st["last_eviction_iter"])
        m._evicted = bool(st["evicted"])
        m._evicted_emb_indices = st["evicted_emb_indices"].to(dev)
    return True


def _history_buffers(m: MCHManagedCollisionModule, size: int, dev: torch.device) -> None:
    """(Re)allocate the module's history buffers with ``size`` entries, as TorchRec's
    ``_init_history_buffers`` does from the first batch (same names, non-persistent)."""
    m._input_history_buffer_size = size
    m._history_accumulator = torch.empty(size, dtype=torch.int64, device=dev)
    m._history_metadata = {}
    for name, _is_mch, is_history in m._eviction_policy.metadata_info:
        if is_history:
            buf = f"_history_{name}"
            m.register_buffer(
                buf, torch.zeros(size, dtype=torch.int64, device=dev), persistent=False
            )
            m._history_metadata[name] = getattr(m, buf)
