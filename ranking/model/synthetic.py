"""Small in-memory inputs for model tests and the model benchmark (no files, no hashing).

``random_batch`` gives a well-formed ``Batch`` for any schema; ``planted_batch`` gives labels
with a planted pairwise interaction: every (feature, bucket) has a hidden vector and
``P(y=1) = sigmoid(scale * sum_{i<j} <u_i, u_j> + w . dense)``, which logistic regression on
one-hot ids cannot represent. Ids are ``random integer mod num_buckets``.
"""

from __future__ import annotations

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ranking.features import ID_LIST, Batch, FeatureSchema


def random_ids(schema: FeatureSchema, B: int, gen: torch.Generator, max_len: int = 3) -> dict:
    """Per sparse feature: ``(values [sum lengths] int64, lengths [B] int64)``; a sequence has
    0 to ``max_length`` ids, its side sequences the same lengths."""
    out = {}
    for f in schema.sparse_features:
        if f.kind == ID_LIST:
            lengths = torch.randint(0, max_len + 1, (B,), generator=gen)
        elif f.is_sequence and f.side_of:
            lengths = out[f.side_of][1]
        elif f.is_sequence:
            lengths = torch.randint(0, f.max_length + 1, (B,), generator=gen)
        else:
            lengths = torch.ones(B, dtype=torch.long)
        # a skewed id distribution, as in real logs
        raw = (torch.rand(int(lengths.sum()), generator=gen) ** 2 * f.num_buckets).long()
        out[f.name] = (raw % f.num_buckets, lengths)
    return out


def make_kjt(schema: FeatureSchema, ids: dict, keys: list[str] | None = None) -> KeyedJaggedTensor:
    """The KJT of ``keys`` (default ``schema.sparse_keys``) from ``random_ids``'s output."""
    keys = schema.sparse_keys if keys is None else keys
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.cat([ids[k][0] for k in keys]) if keys else torch.zeros(0, dtype=torch.long),
        lengths=torch.cat([ids[k][1] for k in keys]) if keys else torch.zeros(0, dtype=torch.long),
    )


def _batch(schema: FeatureSchema, dense, ids: dict, labels) -> Batch:
    seqs = make_kjt(schema, ids, schema.sequence_keys) if schema.sequence_keys else None
    return Batch(dense, make_kjt(schema, ids), labels, sequences=seqs)


def random_batch(schema: FeatureSchema, B: int, seed: int = 0) -> Batch:
    """A random ``Batch`` of B rows (labels uniform 0/1)."""
    gen = torch.Generator().manual_seed(seed)
    ids = random_ids(schema, B, gen)
    dense = torch.randn(B, schema.num_dense, generator=gen)
    labels = torch.randint(0, 2, (B, len(schema.tasks)), generator=gen).float()
    return _batch(schema, dense, ids, labels)


def planted_batch(
    schema: FeatureSchema,
    B: int,
    seed: int = 0,
    rank: int = 4,
    scale: float = 1.5,
    world: int = 1234,
) -> Batch:
    """A ``Batch`` whose labels come from planted pairwise interactions (see module doc).

    ``world`` seeds the hidden vectors (the same for train and test sets); ``seed`` the rows.
    """
    wgen = torch.Generator().manual_seed(world)
    hidden = {
        f.name: torch.randn(f.num_buckets, rank, generator=wgen) / rank**0.5
        for f in schema.sparse_features
    }
    w_dense = torch.randn(schema.num_dense, len(schema.tasks), generator=wgen) * 0.5
    task_sign = torch.randn(len(schema.tasks), generator=wgen).sign()
    gen = torch.Generator().manual_seed(seed)
    ids = random_ids(schema, B, gen)
    vecs = []
    for f in schema.sparse_features:
        values, lengths = ids[f.name]
        seg = torch.repeat_interleave(torch.arange(B), lengths)
        v = torch.zeros(B, rank).index_add_(0, seg, hidden[f.name][values])
        vecs.append(v)
    V = torch.stack(vecs, 1)  # [B, F, r]
    gram = V @ V.transpose(1, 2)
    inter = (gram.sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(1)) / 2  # sum_{i<j}
    inter = (inter - inter.mean()) / (inter.std() + 1e-6)
    dense = torch.randn(B, schema.num_dense, generator=gen)
    logit = scale * inter.unsqueeze(1) * task_sign + dense @ w_dense
    labels = torch.bernoulli(torch.sigmoid(logit), generator=gen)
    return _batch(schema, dense, ids, labels)


def _slice_kjt(kjt: KeyedJaggedTensor, start: int, stop: int) -> KeyedJaggedTensor:
    keys, jts = kjt.keys(), kjt.to_dict()
    vals, lens = [], []
    for k in keys:
        jt = jts[k]
        off = jt.offsets()
        vals.append(jt.values()[off[start] : off[stop]])
        lens.append(jt.lengths()[start:stop])
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.cat(vals), lengths=torch.cat(lens)
    )


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Rows ``start:stop`` of a batch (KJT rows sliced per key; sequences aligned)."""
    seqs = batch.aligned_sequences()
    return Batch(
        batch.dense[start:stop],
        _slice_kjt(batch.sparse, start, stop),
        batch.labels[start:stop],
        sequences=None if seqs is None else _slice_kjt(seqs, start, stop),
    )


def toy_schema(num_tasks: int = 1, num_buckets: int = 40, dim: int = 8) -> FeatureSchema:
    """A small schema for tests: 3 groups (user, item, context), an id-list, 2 dense features."""
    feats = [
        {
            "name": "user",
            "kind": "categorical",
            "num_buckets": num_buckets,
            "dim": dim,
            "group": "user",
        },
        {"name": "age", "kind": "categorical", "num_buckets": 8, "dim": dim, "group": "user"},
        {
            "name": "item",
            "kind": "categorical",
            "num_buckets": num_buckets,
            "dim": dim,
            "group": "item",
        },
        {
            "name": "tags",
            "kind": "id_list",
            "num_buckets": 16,
            "dim": dim,
            "group": "item",
            "pooling": "mean",
        },
        {"name": "hour", "kind": "categorical", "num_buckets": 24, "dim": dim, "group": "context"},
        {"name": "price", "kind": "dense", "group": "item"},
        {"name": "score", "kind": "dense", "group": "context"},
    ]
    tasks = [{"name": f"task{i}", "label": f"label{i}"} for i in range(num_tasks)]
    return FeatureSchema.from_dict({"name": "toy", "tasks": tasks, "features": feats})
