"""Tokenizer: a ``Batch`` (dense floats + KeyedJaggedTensor) becomes T tokens of width D.

Two published recipes (``model.tokenizer``):

- ``groups`` (TokenMixer-Large): one projection per semantic group of the schema,
  ``X_i = Proj_i(concat(e for e in G_i))``: one token per group that has sparse features.
- ``slices`` (RankMixer): all embeddings concatenated in group order into ``e_input``, cut into
  equal slices (zero-padded to a multiple), each slice projected by its own weights.

Dense features form one extra token (a small MLP on ``Batch.dense``) when Nd > 0, and an optional
global token (TokenMixer-Large, an MLP over all groups) goes in front. Each behaviour sequence
adds its encoder's tokens (``ranking/model/sequence.py``: 1 for ``pool`` and
``target_attention``, k for ``query_tokens``). Token order:
``[global?, sparse tokens..., sequence tokens..., dense?]``.

The EmbeddingBagCollection is the attribute ``embeddings.ebc`` (the sequences' tables an
EmbeddingCollection, ``embeddings.ec``, and the managed-collision tables TorchRec's
ManagedCollisionEmbeddingBagCollection, ``embeddings.mc_ebc``), so TorchRec's DistributedModelParallel can shard them;
the tokenizer knows nothing about sharding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from ranking.features import FeatureSchema

from .config import SequenceConfig
from .managed_collision import build_mc_ebc
from .sequence import build_encoder, padded, pooled


def mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    """``Linear -> ReLU -> Linear``: ``[*, d_in] -> [*, d_out]``."""
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out))


class SparseEmbeddings(nn.Module):
    """Pooled embeddings of every categorical and id_list feature, concatenated in the schema's
    group order, and the unpooled embeddings of every behaviour sequence.

    Tables no sequence reads live in an ``EmbeddingBagCollection`` (``ebc``); tables a sequence
    reads (``schema.sequence_tables``, e.g. the item table that the history and the candidate
    share) in an ``EmbeddingCollection`` (``ec``), whose candidate features are pooled here.
    Tables with a managed ``collision`` live in TorchRec's
    ``ManagedCollisionEmbeddingBagCollection`` (``mc_ebc``; ``ranking.model.managed_collision``).
    All are plain TorchRec modules that DistributedModelParallel shards.

    Input: ``sparse`` KJT keyed by ``schema.sparse_keys`` (B rows); ``sequences`` KJT keyed by
    ``schema.sequence_keys`` (S rows) and ``seq_of [B]`` (None: S = B). Output: ``[B, E]`` with
    E the sum of the non-sequence sparse features' dims (``group_widths[g]`` columns per group),
    and per main sequence ``(seq [S, L, d], lengths [S])`` with the side sequences' embeddings
    added, and the embeddings ``[B, d]`` of every feature in ``target_keys``.
    """

    def __init__(
        self,
        schema: FeatureSchema,
        device: torch.device | str | None = None,
        init_scale: float = 0.0,
    ):
        super().__init__()
        dev = None if device is None else torch.device(device)
        seq_tables = schema.sequence_tables
        managed = schema.managed_tables
        mc_names = tuple(t.name for t in managed)
        bag_cfgs = schema.embedding_bag_configs(init_scale, exclude=seq_tables + mc_names)
        self.ebc = EmbeddingBagCollection(tables=bag_cfgs, device=dev) if bag_cfgs else None
        self.mc_ebc = None
        if managed:
            plain = tuple(t.name for t in schema.tables if t.collision is None)
            mc_cfgs = schema.embedding_bag_configs(init_scale, exclude=plain)
            self.mc_ebc = build_mc_ebc(managed, mc_cfgs, dev)
        self.ec = None
        if seq_tables:
            cfgs = schema.embedding_configs(seq_tables, init_scale)
            dims = {c.embedding_dim for c in cfgs}
            if len(dims) > 1:
                raise ValueError(
                    f"{schema.source}: features: the tables read by sequences "
                    f"({', '.join(seq_tables)}) must have one dim (a TorchRec "
                    f"EmbeddingCollection), got {sorted(dims)}"
                )
            self.ec = EmbeddingCollection(tables=cfgs, device=dev)
        dims = {t.name: t.dim for t in schema.tables}
        cols_of = {f.name: dims[f.table] for f in schema.sparse_features}
        self.group_names: list[str] = []
        self.group_widths: list[int] = []
        for g in schema.groups:
            feats = [f for f in schema.features_in_group(g) if f.is_sparse]
            if not feats:
                continue
            self.group_names.append(g)
            self.group_widths.append(sum(cols_of[f.name] for f in feats))
        self.width = sum(self.group_widths)
        # Features in group order. The EBC's output is addressed by key, never by position: a
        # sharded EBC (DistributedModelParallel) returns its keys in a sharding-dependent order.
        self.ordered_keys = [
            f.name for g in self.group_names for f in schema.features_in_group(g) if f.is_sparse
        ]
        keys = schema.sparse_keys
        ec_keys = [k for k in keys if schema.feature(k).table in seq_tables]
        mc_keys = [k for k in keys if schema.feature(k).collision is not None]
        bag_keys = [k for k in keys if k not in ec_keys and k not in mc_keys]
        self.bag_keys, self.ec_keys, self.mc_keys = bag_keys, ec_keys, mc_keys
        self.pooling = {k: schema.feature(k).pooling for k in ec_keys}
        order = bag_keys + mc_keys + ec_keys
        self.permute = None if order == keys else [keys.index(k) for k in order]
        self.sequences = [
            (f.name, f.max_length, [s.name for s in schema.side_sequences(f.name)])
            for f in schema.sequence_features
        ]
        self.target_keys = sorted({f.target for f in schema.sequence_features if f.target})

    def forward(
        self,
        sparse: KeyedJaggedTensor,
        sequences: KeyedJaggedTensor | None = None,
        seq_of: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]], dict[str, Tensor]]:
        """``KJT -> ([B, E] in group order, {sequence: (seq, lengths)}, {target: [B, d]})``."""
        if self.ec is None and self.mc_ebc is None:
            kt = self.ebc(sparse)
            return KeyedTensor.regroup([kt], [self.ordered_keys])[0], {}, {}
        B = sparse.stride()
        if self.permute is not None:
            sparse = sparse.permute(self.permute)
        sizes = [len(self.bag_keys), len(self.mc_keys), len(self.ec_keys)]
        bag_in, mc_in, cand = sparse.split(sizes)
        kts = []
        if self.bag_keys:
            kts.append(self.ebc(bag_in))
        if self.mc_keys:
            kts.append(self.mc_ebc(mc_in)[0])  # (embeddings, remapped ids: not asked for)
        if self.ec is None:
            return KeyedTensor.regroup(kts, [self.ordered_keys])[0], {}, {}
        parts: dict[str, Tensor] = {}
        for kt in kts:
            parts.update(kt.to_dict())
        if seq_of is None:
            ec_in, first = KeyedJaggedTensor.concat([cand, sequences]), 0
        else:
            ec_in, first = _stacked(cand, sequences), B
        out = self.ec(ec_in)
        for k in self.ec_keys:
            jt = out[k]
            parts[k] = pooled(jt.values(), jt.lengths()[:B], self.pooling[k])
        e = torch.cat([parts[k] for k in self.ordered_keys], dim=1)
        seqs = {}
        for name, max_length, sides in self.sequences:
            jt = out[name]
            vals = jt.values()
            for side in sides:
                vals = vals + out[side].values()
            lengths = jt.lengths()[first:]
            seqs[name] = (padded(vals, lengths, max_length), lengths)
        return e, seqs, {k: parts[k] for k in self.target_keys}


def _stacked(cand: KeyedJaggedTensor, seqs: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """One KJT of B + S rows: the candidates' features in rows ``[0, B)`` and the histories in
    rows ``[B, B + S)`` (empty elsewhere), so that one ``EmbeddingCollection`` call looks up
    both with S != B (serving: one history per request)."""
    B, S = cand.stride(), seqs.stride()
    lc = cand.lengths().view(-1, B)
    ls = seqs.lengths().view(-1, S)
    lengths = torch.cat(
        [
            torch.cat([lc, lc.new_zeros(lc.shape[0], S)], 1).flatten(),
            torch.cat([ls.new_zeros(ls.shape[0], B), ls], 1).flatten(),
        ]
    )
    return KeyedJaggedTensor(
        keys=cand.keys() + seqs.keys(),
        values=torch.cat([cand.values(), seqs.values()]),
        lengths=lengths,
        stride=B + S,
    )


class Tokenizer(nn.Module):
    """``Batch -> [B, T, D]``.

    Args:
        schema: the feature schema (tables, groups, dense features).
        dim: token width D.
        mode: ``groups`` or ``slices``.
        num_tokens: total T for ``slices`` (including the dense and global tokens).
        token_proj: ``linear`` or ``mlp`` (per-group projection, ``groups`` mode).
        dense_token: add a token from the dense features when the schema has any.
        global_token: add an MLP-over-all-groups token in front.
        device: where the embedding tables live (``meta`` builds without allocating).

    Example::

        tok = Tokenizer(schema, dim=64, mode="groups")
        x = tok(batch.dense, batch.sparse)   # [B, tok.num_tokens, 64]
    """

    def __init__(
        self,
        schema: FeatureSchema,
        dim: int,
        mode: str = "groups",
        num_tokens: int = 0,
        token_proj: str = "linear",
        dense_token: bool = True,
        global_token: bool = False,
        device: torch.device | str | None = None,
        embedding_init_scale: float = 0.0,
        sequence: SequenceConfig | None = None,
    ):
        super().__init__()
        self.mode, self.dim = mode, dim
        self.embeddings = SparseEmbeddings(schema, device, embedding_init_scale)
        self.num_dense = schema.num_dense
        self.dense_proj = mlp(self.num_dense, dim, dim) if dense_token and self.num_dense else None
        E = self.embeddings.width
        self.global_proj = mlp(E, dim, dim) if global_token else None
        sequence = sequence or SequenceConfig()
        self.encoders = nn.ModuleDict(
            {
                f.name: build_encoder(
                    sequence.encoder_of(f.name), f, f.dim, dim, sequence, schema.source
                )
                for f in schema.sequence_features
            }
        )
        self.targets = {f.name: f.target for f in schema.sequence_features}
        unknown = set(sequence.encoders) - set(self.encoders)
        if unknown:
            raise ValueError(
                f"model.sequence.encoders: {sorted(unknown)[0]!r} is not a main sequence "
                f"feature of schema {schema.name!r} ({', '.join(self.encoders) or 'none'})"
            )
        self.num_seq_tokens = sum(e.num_tokens for e in self.encoders.values())
        extras = (
            int(self.dense_proj is not None)
            + int(self.global_proj is not None)
            + self.num_seq_tokens
        )
        if mode == "groups":
            widths = self.embeddings.group_widths
            make = (
                (lambda w: nn.Linear(w, dim))
                if token_proj == "linear"
                else (lambda w: mlp(w, dim, dim))
            )
            self.group_proj = nn.ModuleList(make(w) for w in widths)
            self.num_tokens = len(widths) + extras
        elif mode == "slices":
            n_slices = num_tokens - extras
            if n_slices < 1:
                raise ValueError(
                    f"model.num_tokens: {num_tokens} leaves no slice tokens after {extras} "
                    "dense/global/sequence tokens"
                )
            self.num_slices = n_slices
            self.slice_width = math.ceil(E / n_slices)
            self.slice_weight = nn.Parameter(torch.empty(n_slices, self.slice_width, dim))
            self.slice_bias = nn.Parameter(torch.zeros(n_slices, dim))
            bound = 1 / math.sqrt(self.slice_width)
            nn.init.uniform_(self.slice_weight, -bound, bound)
            self.num_tokens = num_tokens
        else:
            raise ValueError(f"model.tokenizer: expected 'groups' or 'slices', got {mode!r}")

    def forward(
        self,
        dense: Tensor,
        sparse: KeyedJaggedTensor,
        sequences: KeyedJaggedTensor | None = None,
        seq_of: Tensor | None = None,
    ) -> Tensor:
        """``dense [B, Nd]``, ``sparse`` KJT (and the ``Batch``'s ``sequences``, ``seq_of``)
        -> tokens ``[B, T, D]``."""
        e, seqs, targets = self.embeddings(sparse, sequences, seq_of)  # e: [B, E]
        tokens: list[Tensor] = []
        if self.global_proj is not None:
            tokens.append(self.global_proj(e).unsqueeze(1))
        if self.mode == "groups":
            parts = e.split(self.embeddings.group_widths, dim=1)
            tokens.extend(p(x).unsqueeze(1) for p, x in zip(self.group_proj, parts))
        else:
            B = e.shape[0]
            pad = self.num_slices * self.slice_width - e.shape[1]
            if pad:
                e = torch.nn.functional.pad(e, (0, pad))
            s = e.view(B, self.num_slices, self.slice_width).transpose(0, 1)  # [S, B, s]
            x = torch.baddbmm(self.slice_bias.unsqueeze(1), s, self.slice_weight)  # [S, B, D]
            tokens.append(x.transpose(0, 1))
        for name, enc in self.encoders.items():
            seq, lengths = seqs[name]
            target = targets[self.targets[name]] if self.targets[name] else None
            tokens.append(enc(seq, lengths, target, seq_of))
        if self.dense_proj is not None:
            tokens.append(self.dense_proj(dense).unsqueeze(1))
        return torch.cat(tokens, dim=1)
