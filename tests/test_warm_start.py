"""Warm start and daily partitions (#22): ``data.since``/``until`` over ``dt=`` partitions,
``mixrank train --warm-start`` from an artifact or a checkpoint (hashed and vocabulary tables),
the incompatible-parent errors, and the manifest's lineage.

The parents are trained in this process (one gloo rank, a few steps); one child runs under
real torchrun with 2 ranks and sharded tables. Expected values come from outside the code under
test: row counts from the Parquet footers of the files under the chosen directories, vocabulary
rows from the vocabulary files' lines, fresh rows from the child's own state before the warm
start.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from ranking.errors import UserError
from ranking.train.config import ConfigError, load_experiment

DAYS = ("2024-05-01", "2024-05-02", "2024-05-03")
ROWS = 1200  # per day
BATCH = 128
MODEL = {"arch": "rankmixer", "dim": 16, "num_tokens": 4, "num_layers": 1, "ffn_mult": 1}


@pytest.fixture(scope="module")
def days(tmp_path_factory) -> Path:
    """``root/dt=<day>/part-00000.parquet``, one synthetic day each (another seed per day, the
    same planted signal), plus a file outside any partition."""
    from ranking.data.synth import write_synthetic

    root = tmp_path_factory.mktemp("days")
    for i, day in enumerate(DAYS):
        write_synthetic("frappe", ROWS + 100 * i, root / f"dt={day}", seed=i, progress=False)
    pq.write_table(pq.read_table(root / f"dt={DAYS[0]}"), root / "stray.parquet")
    return root


def _footer_rows(root: Path, dirs: list[str]) -> int:
    total = 0
    for d in dirs:
        for dirpath, _, names in os.walk(root / d):
            for n in names:
                if n.endswith(".parquet"):
                    total += pq.read_metadata(os.path.join(dirpath, n)).num_rows
    return total


def _config(tmp: Path, name: str, data: dict, **train) -> dict:
    return {
        "name": name,
        "schema": "frappe",
        "model": dict(MODEL),
        "data": {"batch_size": BATCH, **data},
        "train": {"max_steps": 4, "threads": 1, "log_every": 2, "seed": 3, **train},
    }


def _write(tmp: Path, cfg: dict, name: str = "cfg.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


class _OneRank:
    """One gloo rank in this process (as the ``one_rank_trainer`` fixture), usable from a
    module fixture; the process group is torn down on exit."""

    def __enter__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.mp = pytest.MonkeyPatch()
        env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
        for k, v in env.items():
            self.mp.setenv(k, v)
        self.threads = torch.get_num_threads()
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(self.threads)
        self.mp.undo()


def _train_in_process(cfg_path: Path, run_dir: Path, warm_start: str | None = None):
    """``mixrank train`` without torchrun: prepare the run directory, then one ``Trainer``."""
    from ranking.train.commands import prepare_run
    from ranking.train.trainer import Trainer

    run = prepare_run(str(cfg_path), [], str(run_dir), warm_start)
    t = Trainer(run)
    assert t.run() == 0
    return t


def _manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "artifact" / "manifest.json").read_text())


def _full(v) -> torch.Tensor:
    """A state-dict entry of one rank's model as a plain tensor (one shard holds it all)."""
    if hasattr(v, "local_shards"):
        (shard,) = v.local_shards()
        return shard.tensor.detach().clone()
    return v.detach().clone()


@pytest.fixture(scope="module")
def parent(days, tmp_path_factory) -> Path:
    """A hashed parent trained on day 1 only (``data.until``): its run directory."""
    tmp = tmp_path_factory.mktemp("parent")
    cfg = _write(tmp, _config(tmp, "parent", {"train": str(days), "until": DAYS[0]},
                              checkpoint_every=2))  # fmt: skip
    with _OneRank():
        _train_in_process(cfg, tmp / "run")
    return tmp / "run"


# ------------------------------------------------------------------ partitions


def test_since_until_select_partitions_by_footer_count(days):
    from ranking.data.reader import ParquetBatches, resolve_files
    from ranking.features import load_schema

    for since, until, chosen in [
        (DAYS[1], "", DAYS[1:]),
        ("", DAYS[0], DAYS[:1]),
        (DAYS[0], DAYS[1], DAYS[:2]),
        ("2024-04-01", "2024-05-02", DAYS[:2]),
    ]:
        files = resolve_files(str(days), since, until)
        dirs = [f"dt={d}" for d in chosen]
        assert {Path(f).parent.name for f in files} == set(dirs)
        reader = ParquetBatches(load_schema("frappe"), files, 64)
        assert reader.num_rows == _footer_rows(days, dirs) == sum(ROWS + 100 * DAYS.index(d)
                                                                   for d in chosen)  # fmt: skip
    # without a selection the directory is read whole, as before (the stray file included)
    whole = resolve_files(str(days))
    assert len(whole) == len(DAYS) + 1 and str(days / "stray.parquet") in whole


@pytest.mark.parametrize(
    "data, key, words",
    [
        ({"since": "2024-5-01"}, "data.since", ["2024-5-01", "YYYY-MM-DD"]),
        ({"until": "2024-02-30"}, "data.until", ["2024-02-30"]),
        ({"since": "2024-06-01"}, "data.since", ["no partition", "dt=2024-05-01", "{days}"]),
        ({"since": "2024-05-03", "until": "2024-05-01"}, "data.since", ["after data.until"]),
        ({"until": "2024-05-01", "train": "{days}/dt=2024-05-01"}, "data.until",
         ["no dt=YYYY-MM-DD partition", "{days}/dt=2024-05-01"]),
    ],
)  # fmt: skip
def test_bad_selection_names_the_key_and_directory(days, data, key, words):
    data = {k: v.format(days=days) for k, v in data.items()}
    cfg = _config(days, "x", {"train": str(days), **data})
    with pytest.raises(ConfigError) as e:
        load_experiment(cfg)
    assert key in str(e.value)
    for w in words:
        assert w.format(days=days) in str(e.value)


def test_unquoted_yaml_dates_are_read_as_text(days, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        f"schema: frappe\nmodel: {{num_tokens: 4}}\n"
        f"data: {{train: {days}, since: 2024-05-02, until: 2024-05-03}}\n"
    )
    exp = load_experiment(path)
    assert (exp.data.since, exp.data.until) == ("2024-05-02", "2024-05-03")


# ------------------------------------------------------------------ warm start, hashed


def test_child_loads_the_parents_weights_before_any_step(parent, days, tmp_path, one_rank_trainer):
    art = parent / "artifact"
    weights = torch.load(art / "weights.pt", weights_only=True)
    cfg = _config(tmp_path, "child", {"train": str(days), "since": DAYS[1]})
    t = one_rank_trainer(cfg, tmp_path / "child")
    fresh = {k: _full(v) for k, v in t.model.state_dict().items()}
    t.warm_start(str(art))
    got = {k: _full(v) for k, v in t.model.state_dict().items()}
    assert set(got) == set(weights)
    for k, w in weights.items():
        assert torch.equal(got[k], w), k
    assert any(not torch.equal(fresh[k], weights[k]) for k in weights)  # it did change
    assert t.lineage["parent_model_version"] == _manifest(parent)["model_version"]


@pytest.mark.slow
def test_torchrun_two_ranks_sharded_child_starts_at_the_parent(parent, days, tmp_path):
    """``mixrank train --nproc 2 --warm-start`` with row-, column-, table-row-wise and
    data-parallel tables: with learning rates 0 the child's artifact is the parent's model,
    its predictions the same on the same rows; its manifest records the parent and the data."""
    from ranking.data.reader import ParquetBatches
    from ranking.export import load_artifact

    sharding = {"user": "row_wise", "item": "column_wise", "city": "table_row_wise",
                "cost": "data_parallel"}  # fmt: skip
    cfg = _write(tmp_path, _config(tmp_path, "child", {"train": str(days), "since": DAYS[1]},
                                   lr=0.0, embedding_lr=0.0, max_steps=3, sharding=sharding))  # fmt: skip
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ranking.cli", "train", "--config", str(cfg), "--nproc", "2",
           "--run-dir", str(run), "--warm-start", str(parent / "artifact")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a = load_artifact(parent / "artifact")
    b = load_artifact(run / "artifact")
    for k, w in a.model.state_dict().items():
        assert torch.equal(b.model.state_dict()[k], w), k
    rows = ParquetBatches(a.schema, str(days / f"dt={DAYS[2]}"), 512, shuffle=False)
    batch = next(iter(rows))
    assert torch.equal(a.predict(batch), b.predict(batch))
    m, pm = b.manifest, a.manifest
    assert m["parent_model_version"] == pm["model_version"] != m["model_version"]
    assert m["parent"]["kind"] == "artifact" and m["parent"]["step"] == 4
    d = m["data"]
    assert d["train"] == str(days) and (d["since"], d["until"]) == (DAYS[1], None)
    assert d["partitions"] == list(DAYS[1:])
    assert d["rows"] == _footer_rows(days, [f"dt={x}" for x in DAYS[1:]])
    assert d["rows_read"] == 3 * BATCH * 2  # 3 steps, 2 ranks, full batches
    # the parent: from scratch, on the first day
    assert pm["parent_model_version"] is None and pm["parent"] is None
    assert pm["data"]["partitions"] == [DAYS[0]] and pm["data"]["rows_read"] == 4 * BATCH


def test_resumed_child_keeps_its_lineage_and_its_own_weights(parent, days, tmp_path):
    """A warm-started run trained to the end, then started again on its run directory: it
    resumes from its own final checkpoint (the warm start is not applied again over it), so it
    exports the same model with the same lineage."""
    cfg = _write(tmp_path, _config(tmp_path, "child", {"train": str(days), "since": DAYS[1]},
                                   max_steps=2))  # fmt: skip
    with _OneRank():
        _train_in_process(cfg, tmp_path / "run", str(parent / "artifact"))
    first = _manifest(tmp_path / "run")
    with _OneRank():
        t = _train_in_process(cfg, tmp_path / "run", str(parent / "artifact"))
    assert t.resumed_from is not None and t.resumed_from.name == "step-00000002"
    again = _manifest(tmp_path / "run")
    assert again["model_version"] == first["model_version"] != _manifest(parent)["model_version"]
    assert again["parent_model_version"] == _manifest(parent)["model_version"]
    assert again["data"] == first["data"]


def _flatten(d: dict, prefix: str = "") -> dict:
    """Nested dicts -> ``{"a.b.c": leaf}``, as DCP names a state dict's entries."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_checkpoint_parent_restores_the_optimiser_state(parent, days, tmp_path):
    """From a checkpoint whose model matches: weights and both optimisers' state come back
    (compared with the saved state, read here with DCP on its own); this run's lr stays in
    force; the parent is recorded as the version its export has (the parent's artifact)."""
    import torch.distributed.checkpoint as dcp

    from ranking.train import checkpoint as ckpt
    from ranking.train.commands import prepare_run
    from ranking.train.optim import lr_lambda
    from ranking.train.trainer import Trainer

    final = ckpt.latest(parent / "checkpoints")
    cfg = _write(tmp_path, _config(tmp_path, "child", {"train": str(days), "since": DAYS[1]},
                                   lr=0.0123, max_steps=2))  # fmt: skip
    with _OneRank():
        t = Trainer(prepare_run(str(cfg), [], str(tmp_path / "run"), str(parent)))
        t.scheduler = torch.optim.lr_scheduler.LambdaLR(t.dense_opt, lr_lambda(t.cfg, 2))
        t.warm_start(t.cfg.train.warm_start)
        mine = {k: _full(v) for k, v in _flatten(t.state()).items()
                if k.startswith(("model.", "optim.state.")) and isinstance(v, torch.Tensor)}  # fmt: skip
        saved = {k: torch.empty_like(v) for k, v in mine.items()}
        dcp.load(saved, checkpoint_id=str(final), no_dist=True)
        assert any(k.endswith(".exp_avg") for k in saved)  # adamw's moments
        assert any("momentum1" in k for k in saved)  # the fused tables' row-wise adagrad
        for k in saved:
            assert torch.equal(mine[k], saved[k]), k
        assert {g["lr"] for g in t.dense_opt.param_groups} == {0.0123}
        assert t.lineage["parent"]["kind"] == "checkpoint"
        assert t.lineage["parent"]["path"] == str(final)
        assert t.lineage["parent_model_version"] == _manifest(parent)["model_version"]


# ------------------------------------------------------------------ warm start, vocabularies


def test_vocabulary_rows_move_to_their_new_index(days, tmp_path, one_rank_trainer):
    """Parent and child build their vocabularies from their own days: a value in both has the
    parent's row at its new index, a value new on the child's days keeps the child's fresh
    row, the missing and OOV rows are the parent's."""
    from ranking.export import load_artifact
    from ranking.train.commands import prepare_run

    pcfg = _write(tmp_path, _config(tmp_path, "vp", {"train": str(days), "until": DAYS[0],
                                                     "vocab_from_train": True}), "p.yaml")  # fmt: skip
    with _OneRank():
        _train_in_process(pcfg, tmp_path / "p")
    art = load_artifact(tmp_path / "p" / "artifact")
    ccfg = _write(tmp_path, _config(tmp_path, "vc", {"train": str(days), "since": DAYS[1],
                                                     "vocab_from_train": True}), "c.yaml")  # fmt: skip
    run = prepare_run(str(ccfg), [], str(tmp_path / "c"), str(tmp_path / "p" / "artifact"))
    t = one_rank_trainer(run / "config.yaml", run)
    key = "tokenizer.embeddings.ebc.embedding_bags.{}.weight"
    fresh = {k: _full(v) for k, v in t.model.state_dict().items()}
    t.warm_start(t.cfg.train.warm_start)
    got = {k: _full(v) for k, v in t.model.state_dict().items()}
    checked = {"both": 0, "new": 0}
    for table in ("user", "item", "city"):
        old = (tmp_path / "p" / "artifact" / "vocab" / f"{table}.txt").read_text().splitlines()
        new = (run / "vocab" / f"{table}.txt").read_text().splitlines()
        pw, k = art.model.state_dict()[key.format(table)], key.format(table)
        assert got[k].shape[0] == len(new) + 2 and pw.shape[0] == len(old) + 2
        assert torch.equal(got[k][:2], pw[:2])  # missing, OOV
        for j, v in enumerate(new):
            if v in old:
                assert torch.equal(got[k][j + 2], pw[old.index(v) + 2]), (table, v)
                checked["both"] += 1
            else:
                assert torch.equal(got[k][j + 2], fresh[k][j + 2]), (table, v)
                checked["new"] += 1
    assert checked["both"] > 50 and checked["new"] > 50, checked  # both cases really met
    assert t.lineage["parent_model_version"] == art.model_version


# ------------------------------------------------------------------ incompatible parents


def _schema_variant(tmp: Path, change) -> str:
    from ranking.features import load_schema

    d = load_schema("frappe").to_dict()
    change(d)
    path = tmp / "schema.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return str(path)


def _feature(name, **kw):
    def change(d):
        for f in d["features"]:
            if f["name"] == name:
                f.update(kw)

    return change


def _drop(name):
    def change(d):
        d["features"] = [f for f in d["features"] if f["name"] != name]

    return change


def _tasks(d):
    d["tasks"] = [{"name": "buy", "label": "label"}]


@pytest.mark.parametrize(
    "schema_change, model, data, message",
    [
        (_feature("item", dim=32), {}, {}, "feature 'item': dim 16 in the parent, 32 here"),
        (_feature("item", num_buckets=4096), {}, {},
         "feature 'item': num_buckets 8192 in the parent, 4096 here"),
        (_drop("city"), {"num_tokens": 4}, {}, "feature 'city': in the parent, not here"),
        (_tasks, {}, {}, "tasks: ['click'] in the parent, ['buy'] here"),
        (None, {"arch": "dlrm", "num_tokens": 0}, {}, "model.arch: 'rankmixer' in the parent"),
        (None, {"num_layers": 2}, {}, "model.num_layers: 1 in the parent, 2 here"),
        (None, {}, {"vocab_from_train": True},
         "feature 'user': hashed in the parent, a vocabulary here"),
    ],
)  # fmt: skip
def test_incompatible_parent_is_refused_naming_the_feature(
    parent, days, tmp_path, schema_change, model, data, message
):
    from ranking.train.commands import prepare_run

    cfg = _config(tmp_path, "child", {"train": str(days), "since": DAYS[1], **data})
    if schema_change is not None:
        cfg["schema"] = _schema_variant(tmp_path, schema_change)
    cfg["model"].update(model)
    if cfg["model"]["arch"] == "dlrm":
        cfg["model"] = {"arch": "dlrm", "dim": 16}
    path = _write(tmp_path, cfg)
    art = parent / "artifact"
    with pytest.raises(UserError) as e:
        prepare_run(str(path), [], str(tmp_path / "run"), str(art))
    assert str(e.value).startswith(f"--warm-start {art}: "), str(e.value)
    assert message in str(e.value), str(e.value)
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before the run exists


class _Shard:
    """The parts of a ShardedTensor's local shard that ``copy_into`` reads."""

    def __init__(self, tensor, r0, c0):
        self.tensor = tensor
        self.metadata = type("M", (), {"shard_offsets": [r0, c0],
                                       "shard_sizes": list(tensor.shape)})()  # fmt: skip


class _Sharded:
    def __init__(self, shards):
        self._shards = shards

    def local_shards(self):
        return self._shards


@pytest.mark.parametrize("cut", ["rows", "columns"])
def test_shards_of_a_vocabulary_table_get_their_rows(cut):
    """Row- and column-wise shards (as a rank of a sharded table holds them) receive, at their
    offsets, the rows that indexing the whole tables gives."""
    from ranking.train.warm_start import copy_into

    torch.manual_seed(0)
    parent = torch.randn(9, 4)  # missing, OOV, 7 values
    fresh = torch.randn(12, 4)  # missing, OOV, 10 values
    moves = {2: 8, 3: 2, 7: 5, 10: 4, 11: 3}  # child row <- parent row (values in both)
    child_rows = torch.tensor([0, 1, *moves])
    parent_rows = torch.tensor([0, 1, *moves.values()])
    want = fresh.clone()
    for c, p in {0: 0, 1: 1, **moves}.items():
        want[c] = parent[p]
    if cut == "rows":
        shards = [_Shard(fresh[:5].clone(), 0, 0), _Shard(fresh[5:].clone(), 5, 0)]
    else:
        shards = [_Shard(fresh[:, :3].clone(), 0, 0), _Shard(fresh[:, 3:].clone(), 0, 3)]
    copy_into({"t": _Sharded(shards)}, {"t": parent}, {"t": (child_rows, parent_rows)})
    got = torch.cat([s.tensor for s in shards], dim=0 if cut == "rows" else 1)
    assert torch.equal(got, want)
