"""The transient state of TorchRec's MCH modules (``ranking.train.mc_state``): a module rebuilt
from its ``state_dict`` plus :func:`capture`'s state, saved and loaded as the trainer's
``rank-<r>.pt`` is, continues exactly as the module that never stopped (the reference);
from the ``state_dict`` alone it does not (so the comparison can fail). The end-to-end check
is ``tests/test_resume_matrix.py`` (``configs/mc_stream.yaml`` under torchrun, 2 ranks)."""

from __future__ import annotations

import io

import pytest
import torch
from torchrec.modules.mc_modules import MCHManagedCollisionModule
from torchrec.sparse.jagged_tensor import JaggedTensor

from ranking.errors import UserError
from ranking.features import CollisionSpec
from ranking.model.managed_collision import eviction_policy as policy_of
from ranking.train import mc_state

ROWS, INTERVAL, ID_SPACE = 16, 4, 200


def _module(policy: str) -> MCHManagedCollisionModule:
    c = CollisionSpec(rows=ROWS, policy=policy, eviction_interval=INTERVAL, id_space=ID_SPACE)
    return MCHManagedCollisionModule(
        zch_size=ROWS,
        device=torch.device("cpu"),
        eviction_policy=policy_of(c),
        eviction_interval=INTERVAL,
        input_hash_size=ID_SPACE,
        name="item",
    ).train()


def _batches(n: int) -> list[dict[str, JaggedTensor]]:
    """Skewed ids whose popular set drifts (evictions happen), batches of varying size (the
    history buffer is sized from the first one)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for step in range(n):
        size = 24 + 8 * (step % 3)
        ids = (torch.randint(0, 40, (size,), generator=g) ** 2 // 40 + 7 * step) % ID_SPACE
        out.append({"item": JaggedTensor(values=ids, lengths=torch.ones(size, dtype=torch.int32))})
    return out


def _run(m: MCHManagedCollisionModule, batches) -> list:
    """What each step produces: the remapped ids and the rows the step evicted."""
    seen = []
    for b in batches:
        rows = m(b)["item"].values().clone()
        ev = m.evict()
        seen.append((rows, None if ev is None else ev.clone()))
    return seen


def _same(a: list, b: list) -> bool:
    return all(
        torch.equal(ra, rb) and (ea is None) == (eb is None) and (ea is None or torch.equal(ea, eb))
        for (ra, ea), (rb, eb) in zip(a, b, strict=True)
    )


def _saved(state: dict) -> dict:
    """Round trip through ``torch.save`` / ``torch.load(weights_only=True)``, as ``rank-<r>.pt``."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("policy", ["lfu", "lru", "distance_lfu"])
@pytest.mark.parametrize("stop", [6, 8])  # mid-interval; right after an eviction
def test_restored_module_continues_as_the_uninterrupted_one(policy, stop):
    batches = _batches(20)
    ref = _module(policy)
    _run(ref, batches[:stop])
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    local = _saved(mc_state.capture(ref))
    expected = _run(ref, batches[stop:])

    resumed = _module(policy)
    resumed.load_state_dict(sd)
    assert mc_state.restore(resumed, local, "ckpt")
    assert _same(_run(resumed, batches[stop:]), expected)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in resumed.state_dict().items())

    if stop % INTERVAL:  # without the history and phase the continuation differs
        plain = _module(policy)
        plain.load_state_dict(sd)
        assert not _same(_run(plain, batches[stop:]), expected)


def test_restore_refuses_other_modules_and_reports_a_missing_state():
    m = _module("lfu")
    _run(m, _batches(3))
    local = mc_state.capture(m)
    other = torch.nn.ModuleDict({"user": _module("lfu")})
    with pytest.raises(UserError, match=r"ckpt-x.*does not match"):
        mc_state.restore(other, local, "ckpt-x")
    assert mc_state.restore(_module("lfu"), {}, "ckpt") is False
    assert mc_state.restore(torch.nn.Linear(2, 2), {}, "ckpt") is True
