"""Tokenizer: a ``Batch`` (dense floats + KeyedJaggedTensor) becomes T tokens of width D.

Two published recipes (``model.tokenizer``):

- ``groups`` (TokenMixer-Large): one projection per semantic group of the schema,
  ``X_i = Proj_i(concat(e for e in G_i))``: one token per group that has sparse features.
- ``slices`` (RankMixer): all embeddings concatenated in group order into ``e_input``, cut into
  equal slices (zero-padded to a multiple), each slice projected by its own weights.

Dense features form one extra token (a small MLP on ``Batch.dense``) when Nd > 0, and an optional
global token (TokenMixer-Large, an MLP over all groups) goes in front. Token order:
``[global?, sparse tokens..., dense?]``.

The EmbeddingBagCollection is the attribute ``ebc``, so TorchRec's DistributedModelParallel can
shard it; the tokenizer knows nothing about sharding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from ranking.features import FeatureSchema


def mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    """``Linear -> ReLU -> Linear``: ``[*, d_in] -> [*, d_out]``."""
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out))


class SparseEmbeddings(nn.Module):
    """Pooled embeddings of every sparse feature, concatenated in the schema's group order.

    Input: KJT keyed by ``schema.sparse_keys``. Output: ``[B, E]`` with E the sum of the
    sparse features' dims; ``group_widths[g]`` columns per group (groups with no sparse feature
    are absent from ``group_names``).
    """

    def __init__(
        self,
        schema: FeatureSchema,
        device: torch.device | str | None = None,
        init_scale: float = 0.0,
    ):
        super().__init__()
        self.ebc = EmbeddingBagCollection(
            tables=schema.embedding_bag_configs(init_scale),
            device=None if device is None else torch.device(device),
        )
        # EBC output column order: tables in order, features within each table.
        offsets: dict[str, tuple[int, int]] = {}
        pos = 0
        for cfg in self.ebc.embedding_bag_configs():
            for name in cfg.feature_names:
                offsets[name] = (pos, cfg.embedding_dim)
                pos += cfg.embedding_dim
        cols: list[int] = []
        self.group_names: list[str] = []
        self.group_widths: list[int] = []
        for g in schema.groups:
            feats = [f for f in schema.features_in_group(g) if f.is_sparse]
            if not feats:
                continue
            self.group_names.append(g)
            self.group_widths.append(sum(f.dim for f in feats))
            for f in feats:
                start, dim = offsets[f.name]
                cols.extend(range(start, start + dim))
        self.width = len(cols)
        # Features in group order. The EBC's output is addressed by key, never by position: a
        # sharded EBC (DistributedModelParallel) returns its keys in a sharding-dependent order.
        self.ordered_keys = [
            f.name for g in self.group_names for f in schema.features_in_group(g) if f.is_sparse
        ]

    def forward(self, sparse: KeyedJaggedTensor) -> Tensor:
        """``KJT -> [B, E]`` (group order)."""
        kt = self.ebc(sparse)
        return KeyedTensor.regroup([kt], [self.ordered_keys])[0]


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
    ):
        super().__init__()
        self.mode, self.dim = mode, dim
        self.embeddings = SparseEmbeddings(schema, device, embedding_init_scale)
        self.num_dense = schema.num_dense
        self.dense_proj = mlp(self.num_dense, dim, dim) if dense_token and self.num_dense else None
        E = self.embeddings.width
        self.global_proj = mlp(E, dim, dim) if global_token else None
        extras = int(self.dense_proj is not None) + int(self.global_proj is not None)
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
                    f"model.num_tokens: {num_tokens} leaves no slice tokens after {extras} dense/global"
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

    def forward(self, dense: Tensor, sparse: KeyedJaggedTensor) -> Tensor:
        """``dense [B, Nd]``, ``sparse`` KJT -> tokens ``[B, T, D]``."""
        e = self.embeddings(sparse)  # [B, E]
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
        if self.dense_proj is not None:
            tokens.append(self.dense_proj(dense).unsqueeze(1))
        return torch.cat(tokens, dim=1)
