"""Multi-task heads over the pooled representation ``z [B, P]`` (``model.heads``).

- ``separate`` (``ranker.TaskHeads``): ``logit_t = tower_t(z)``.
- ``mmoe`` (Ma et al., KDD 2018): ``E`` shared experts ``f_e`` (MLPs), a softmax gate per task,
  ``h_t = sum_e softmax(W_t z)_e f_e(z)``, ``logit_t = tower_t(h_t)``.
- ``ple`` (Tang et al., RecSys 2020; one level = CGC): each level has ``task_experts`` experts
  of each task and ``shared_experts`` shared ones. With inputs ``x_t`` per task and ``x_s``
  shared (all ``z`` at the first level), task ``t``'s output is
  ``y_t = sum_i softmax(W_t x_t)_i g_i`` over its own experts applied to ``x_t`` and the
  shared experts applied to ``x_s``; below the last level the shared output
  ``y_s = sum_i softmax(W_s x_s)_i g_i`` runs over every expert of the level. Then
  ``logit_t = tower_t(y_t)`` after the last level.

Towers are ``TaskHeads``' per-task MLPs (defined here; ``ranking.model.ranker`` re-exports it) (``head_hidden``, ``head_dropout``), so ``separate`` is
the special case without experts. Gates and experts are plain ``nn.Linear`` stacks: they run
once per row, after pooling (small next to the mixer stack).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TaskHeads(nn.Module):
    """One MLP head per task: ``[B, P] -> [B, n_tasks]``.

    ``dropout`` (training only) drops the pooled input and the output of each hidden ReLU; it is
    applied functionally, so the parameter names (``heads.<task>.<layer>``) do not depend on it.
    """

    def __init__(self, in_dim: int, tasks: list[str], hidden: list[int], dropout: float = 0.0):
        super().__init__()
        self.tasks = list(tasks)
        self.dropout = dropout
        heads = []
        for _ in self.tasks:
            layers, d = [], in_dim
            for h in hidden:
                layers += [nn.Linear(d, h), nn.ReLU()]
                d = h
            layers.append(nn.Linear(d, 1))
            heads.append(nn.Sequential(*layers))
        self.heads = nn.ModuleList(heads)

    def _head(self, head: nn.Sequential, z: Tensor) -> Tensor:
        if not (self.dropout and self.training):
            return head(z)
        z = F.dropout(z, self.dropout, training=True)
        for layer in head:
            z = layer(z)
            if isinstance(layer, nn.ReLU):
                z = F.dropout(z, self.dropout, training=True)
        return z

    def one(self, task: int, z: Tensor) -> Tensor:
        """Task ``task``'s head on its own input ``z [B, P]`` -> ``[B, 1]`` (the towers of the
        MMoE / PLE heads, ``ranking/model/heads.py``)."""
        return self._head(self.heads[task], z)

    def forward(self, z: Tensor) -> Tensor:
        return torch.cat([self._head(h, z) for h in self.heads], dim=1)


def expert_mlp(d_in: int, hidden: list[int]) -> nn.Sequential:
    """``Linear -> ReLU`` per width: ``[B, d_in] -> [B, hidden[-1]]``."""
    layers, d = [], d_in
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    return nn.Sequential(*layers)


def mix(gate: nn.Linear, x: Tensor, outputs: list[Tensor]) -> Tensor:
    """``sum_i softmax(gate(x))_i outputs[i]``: ``[B, d] x E -> [B, d]``."""
    w = torch.softmax(gate(x).float(), dim=-1).to(outputs[0].dtype)  # [B, E]
    return torch.einsum("be,bed->bd", w, torch.stack(outputs, dim=1))


class MMoEHeads(nn.Module):
    """``z [B, P] -> logits [B, n_tasks]`` through shared experts and a gate per task."""

    def __init__(self, in_dim: int, tasks: list[str], cfg, towers: nn.Module):
        super().__init__()
        self.experts = nn.ModuleList(
            expert_mlp(in_dim, cfg.expert_hidden) for _ in range(cfg.experts)
        )
        self.gates = nn.ModuleList(nn.Linear(in_dim, cfg.experts) for _ in tasks)
        self.towers = towers  # TaskHeads over expert_hidden[-1]

    def forward(self, z: Tensor) -> Tensor:
        outs = [e(z) for e in self.experts]
        h = [mix(g, z, outs) for g in self.gates]
        return torch.cat([self.towers.one(t, x) for t, x in enumerate(h)], dim=1)


class PLEHeads(nn.Module):
    """``z [B, P] -> logits [B, n_tasks]`` through ``levels`` extraction levels."""

    def __init__(self, in_dim: int, tasks: list[str], cfg, towers: nn.Module):
        super().__init__()
        n, out = len(tasks), cfg.expert_hidden[-1]
        self.levels = nn.ModuleList()
        d = in_dim
        for level in range(cfg.levels):
            last = level == cfg.levels - 1
            lv = nn.Module()
            lv.task_experts = nn.ModuleList(
                nn.ModuleList(expert_mlp(d, cfg.expert_hidden) for _ in range(cfg.task_experts))
                for _ in range(n)
            )
            lv.shared_experts = nn.ModuleList(
                expert_mlp(d, cfg.expert_hidden) for _ in range(cfg.shared_experts)
            )
            lv.task_gates = nn.ModuleList(
                nn.Linear(d, cfg.task_experts + cfg.shared_experts) for _ in range(n)
            )
            lv.shared_gate = (
                None if last else nn.Linear(d, n * cfg.task_experts + cfg.shared_experts)
            )
            self.levels.append(lv)
            d = out
        self.towers = towers

    def forward(self, z: Tensor) -> Tensor:
        n = len(self.towers.heads)
        xs, shared = [z] * n, z
        for lv in self.levels:
            task_outs = [[e(xs[t]) for e in lv.task_experts[t]] for t in range(n)]
            shared_outs = [e(shared) for e in lv.shared_experts]
            ys = [mix(lv.task_gates[t], xs[t], task_outs[t] + shared_outs) for t in range(n)]
            if lv.shared_gate is not None:
                every = [o for outs in task_outs for o in outs] + shared_outs
                shared = mix(lv.shared_gate, shared, every)
            xs = ys
        return torch.cat([self.towers.one(t, x) for t, x in enumerate(xs)], dim=1)


def build_heads(in_dim: int, tasks: list[str], hidden: list[int], dropout: float, cfg) -> nn.Module:
    """The heads of ``model.heads`` (``cfg``): ``[B, in_dim] -> [B, n_tasks]``."""
    if cfg.type == "separate":
        return TaskHeads(in_dim, tasks, hidden, dropout=dropout)
    towers = TaskHeads(cfg.expert_hidden[-1], tasks, hidden, dropout=dropout)
    if cfg.type == "mmoe":
        return MMoEHeads(in_dim, tasks, cfg, towers)
    return PLEHeads(in_dim, tasks, cfg, towers)
