"""Behaviour-sequence encoders: a padded history of embeddings becomes tokens for the mixer.

Each sequence feature of the schema (``kind: sequence``) gets one encoder, chosen by
``model.sequence`` (``SequenceConfig``). Shapes, with S histories, B rows (candidates), L the
feature's ``max_length``, d its embedding dim and D the model's token width:

- ``seq [S, L, d]``: the history's embeddings (side sequences' added), zero padding;
- ``lengths [S]``: items per history; ``seq_of [B]`` the history of each row (None: S = B,
  row b reads history b). In serving the candidates of one request share one history, so its
  lookups and key/value projections run once per request, not once per candidate;
- ``target [B, d]``: the embedding of each row's candidate item (the sequence's ``target``
  feature, a categorical of the same table), for ``target_attention``.

Encoders (each ``forward(seq, lengths, target, seq_of) -> [B, k, D]``):

- ``PoolEncoder`` (``pool``): the mean (or sum) over the history, projected: one token.
- ``TargetAttentionEncoder`` (``target_attention``): DIN-style; the candidate's embedding is the
  query of a softmax attention over the history (``kernels.target_attention``), one token.
  Query and history are layer-normed before their projections: embeddings start near 0 (the
  tables' init), where a dot product of two projections has no gradient to learn from (without
  the norms, target attention stayed at pooling's AUC on the sequence preset).
- ``QueryTokensEncoder`` (``query_tokens``): k learned queries attend over the history,
  independent of the candidate: k tokens, computed per history.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import kernels
from ranking.features import expand_rows  # noqa: F401 - re-exported

from .config import ConfigError, SequenceConfig


def padded(values: Tensor, lengths: Tensor, max_length: int) -> Tensor:
    """Jagged rows ``values [N, d]`` with ``lengths [S]`` -> ``[S, max_length, d]``, zero
    padding (rows are at most ``max_length`` long: the data path truncates them)."""
    S, d = lengths.numel(), values.shape[-1]
    out = values.new_zeros(S, max_length, d)
    if values.numel():
        row = torch.repeat_interleave(torch.arange(S, device=values.device), lengths)
        col = torch.arange(values.shape[0], device=values.device) - torch.repeat_interleave(
            torch.cumsum(lengths, 0) - lengths, lengths
        )
        out = out.index_put((row, col), values)
    return out


def pooled(values: Tensor, lengths: Tensor, mode: str) -> Tensor:
    """Jagged rows ``values [N, d]``, ``lengths [R]`` -> ``[R, d]`` sum or mean (0 if empty)."""
    R = lengths.numel()
    row = torch.repeat_interleave(torch.arange(R, device=values.device), lengths)
    out = values.new_zeros(R, values.shape[-1]).index_add(0, row, values)
    if mode == "mean":
        out = out / lengths.clamp(min=1).to(out.dtype).unsqueeze(1)
    return out


def _gather(x: Tensor, seq_of: Tensor | None) -> Tensor:
    return x if seq_of is None else x[seq_of]


class PoolEncoder(nn.Module):
    """``pool``: ``seq [S, L, d]`` -> mean (or sum) over the ``lengths`` -> ``Linear(d, D)``
    -> ``[B, 1, D]`` (per history, then gathered by ``seq_of``)."""

    num_tokens = 1

    def __init__(self, d: int, D: int, pooling: str = "mean"):
        super().__init__()
        self.proj, self.pooling = nn.Linear(d, D), pooling

    def forward(self, seq: Tensor, lengths: Tensor, target=None, seq_of=None) -> Tensor:
        s = seq.sum(1)
        if self.pooling == "mean":
            s = s / lengths.clamp(min=1).to(s.dtype).unsqueeze(1)
        return _gather(self.proj(s), seq_of).unsqueeze(1)


class TargetAttentionEncoder(nn.Module):
    """``target_attention``: ``q = W_q LN(target) [B, H, a/H]``, ``k = W_k LN(seq)``,
    ``v = W_v LN(seq)``
    ``[S, L, H, a/H]``; softmax attention masked by ``lengths`` (``kernels.target_attention``),
    heads concatenated, ``W_o``: ``[B, 1, D]``. ``k``/``v`` are per history (once per request in
    serving); only ``q`` and the attention are per candidate. An empty history gives ``W_o``'s
    bias."""

    num_tokens = 1

    def __init__(self, d: int, D: int, heads: int, attn_dim: int):
        super().__init__()
        self.heads, self.attn_dim = heads, attn_dim
        self.norm_q, self.norm_kv = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q = nn.Linear(d, attn_dim)
        self.kv = nn.Linear(d, 2 * attn_dim)
        self.out = nn.Linear(attn_dim, D)

    def keys_values(self, seq: Tensor) -> tuple[Tensor, Tensor]:
        """The candidate-independent part: ``[S, L, d] -> k, v [S, L, H, a/H]``."""
        S, L, _ = seq.shape
        kv = self.kv(self.norm_kv(seq)).view(S, L, 2, self.heads, self.attn_dim // self.heads)
        return kv[:, :, 0], kv[:, :, 1]

    def forward(self, seq: Tensor, lengths: Tensor, target: Tensor, seq_of=None) -> Tensor:
        k, v = self.keys_values(seq)
        B = target.shape[0]
        q = self.q(self.norm_q(target)).view(B, self.heads, self.attn_dim // self.heads)
        o = kernels.target_attention(q, k, v, lengths, seq_of)  # [B, H, a/H]
        return self.out(o.reshape(B, self.attn_dim)).unsqueeze(1)


class QueryTokensEncoder(nn.Module):
    """``query_tokens``: k learned queries ``[k, H, a/H]`` attend over each layer-normed history (masked by
    ``lengths``): ``[S, k, a]`` -> ``W_o`` -> ``[S, k, D]``, gathered by ``seq_of``: ``[B, k, D]``.
    Independent of the candidate, so computed once per history."""

    def __init__(self, d: int, D: int, heads: int, attn_dim: int, num_queries: int):
        super().__init__()
        self.heads, self.attn_dim, self.num_tokens = heads, attn_dim, num_queries
        self.queries = nn.Parameter(torch.randn(num_queries, heads, attn_dim // heads))
        self.norm_kv = nn.LayerNorm(d)
        self.kv = nn.Linear(d, 2 * attn_dim)
        self.out = nn.Linear(attn_dim, D)

    def forward(self, seq: Tensor, lengths: Tensor, target=None, seq_of=None) -> Tensor:
        S, L, _ = seq.shape
        kv = self.kv(self.norm_kv(seq)).view(S, L, 2, self.heads, self.attn_dim // self.heads)
        kq = self.num_tokens
        q = self.queries.unsqueeze(0).expand(S, -1, -1, -1).reshape(S * kq, self.heads, -1)
        rows = torch.arange(S, device=seq.device).repeat_interleave(kq)
        o = kernels.target_attention(q.to(kv.dtype), kv[:, :, 0], kv[:, :, 1], lengths, rows)
        tokens = self.out(o.reshape(S, kq, self.attn_dim))
        return _gather(tokens, seq_of)


def build_encoder(
    kind: str, feature, d: int, D: int, cfg: SequenceConfig, source: str = "<dict>"
) -> nn.Module:
    """The encoder ``kind`` for sequence ``feature`` (a ``FeatureSpec``) of embedding dim d."""
    a = cfg.attn_dim or D
    if kind == "pool":
        return PoolEncoder(d, D, feature.pooling)
    if kind == "target_attention":
        if not feature.target:
            raise ConfigError(
                f"{source}: model.sequence.encoder: target_attention for {feature.name!r} needs "
                f"a target, a categorical feature of its table {feature.table!r} (schema: "
                f"features[{feature.name}].table / .target)"
            )
        return TargetAttentionEncoder(d, D, cfg.heads, a)
    if kind == "query_tokens":
        return QueryTokensEncoder(d, D, cfg.heads, a, cfg.query_tokens)
    raise ConfigError(f"{source}: model.sequence.encoder: unknown encoder {kind!r}")
