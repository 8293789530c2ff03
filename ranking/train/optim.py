"""The dense optimiser, its parameter groups and learning-rate schedule, and its state for an
in-place checkpoint load. The embedding tables' optimiser is fused into their TorchRec kernels
(``ranking.train.sharding.fused_params``); data-parallel tables are updated here."""

from __future__ import annotations

import math

import torch

from ranking.train.config import ExperimentConfig


def dense_param_groups(named_params: dict, embedding_names: set[str], cfg: ExperimentConfig):
    """Parameter groups of the dense optimiser: data-parallel embedding tables decay by
    ``train.embedding_weight_decay``, everything else by ``train.weight_decay``."""
    t = cfg.train
    emb = [p for n, p in named_params.items() if n in embedding_names]
    rest = [p for n, p in named_params.items() if n not in embedding_names]
    groups = []
    if rest:
        groups.append({"params": rest, "weight_decay": t.weight_decay})
    if emb:
        groups.append({"params": emb, "weight_decay": t.embedding_weight_decay})
    return groups


def dense_optimizer_factory(cfg: ExperimentConfig, embedding_names: set[str] | None = None):
    """A factory for TorchRec's ``KeyedOptimizerWrapper``: it gets the ``{name: param}`` dict and
    returns the dense optimiser, with the embedding/dense parameter groups above."""
    t = cfg.train
    names = embedding_names or set()

    def make(named: dict):
        groups = dense_param_groups(named, names, cfg)
        # torch's fused kernels (one pass over every tensor, CPU and CUDA): the default
        # per-tensor loop was 1.6 ms of a 10 ms Frappe DLRM step, the fused one ~4x faster; the
        # same update up to float rounding
        if t.dense_optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=t.lr, fused=True)
        if t.dense_optimizer == "adam":
            return torch.optim.Adam(groups, lr=t.lr, fused=True)
        if t.dense_optimizer == "adagrad":
            return torch.optim.Adagrad(groups, lr=t.lr, fused=True)
        return torch.optim.RMSprop(groups, lr=t.lr, momentum=t.momentum, alpha=0.99, eps=1e-8)

    return make


def lr_lambda(cfg: ExperimentConfig, total_steps: int):
    """Linear warm-up, then constant, linear or cosine decay to ``min_lr_ratio``."""
    t = cfg.train

    def f(step: int) -> float:
        if t.warmup_steps and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.schedule == "constant" or total_steps <= t.warmup_steps:
            return 1.0
        frac = min(1.0, (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps))
        if t.schedule == "linear":
            decay = 1.0 - frac
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * frac))
        return t.min_lr_ratio + (1.0 - t.min_lr_ratio) * decay

    return f


def init_dense_state(opt, params: list[torch.Tensor], saved: set[str]) -> None:
    """Create the state of the dense optimiser ``opt`` (TorchRec's ``KeyedOptimizerWrapper``)
    before an in-place checkpoint load, with the entries of checkpoint keys ``saved`` only.

    torch optimisers create their state lazily, at a parameter's first step: a fresh optimiser
    has none, and ``dcp.load`` fills only the keys the target has, so Adam's moments and step
    count were silently not restored (issue #25). TorchRec's ``init_state`` creates it with a
    zero-gradient step; the state of a parameter that had none when the checkpoint was written
    (it never got a gradient) is removed again, so the restored state has exactly the saved
    parameters. The dummy step changes the parameters (weight decay); the load that follows
    overwrites them."""
    opt.init_state()
    for p in params:
        p.grad = None
    for key, p in opt.params.items():
        if not any(k.startswith(f"optim.state.{key}.") for k in saved):
            opt.state.pop(p, None)
