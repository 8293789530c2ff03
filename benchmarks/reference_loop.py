"""A plain PyTorch training loop on Frappe, without TorchRec or our trainer: an independent
reference for docs/RESULTS.md (recipe B, the embedding initialisation, and what a plain MLP
reaches on the same data).

One process, ``nn.Embedding`` over per-field vocabularies of train (value -> row, unseen -> a
shared row), Adam with the FuxiCTR-style embedding regulariser ``reg / 2 * ||W||^2`` on the whole
table, evaluation on valid after every epoch, the learning rate divided by 10 after an epoch
without improvement, stop after ``--patience`` such epochs.

    python -m benchmarks.reference_loop --model mlp                    # 3 x 400 MLP with BN
    python -m benchmarks.reference_loop --model rankmixer --emb 16     # T=8, D=32, L=2 mixer
    python -m benchmarks.reference_loop --model rankmixer --emb 16 --init torchrec
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "frappe"


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """Mann-Whitney AUC (ties broken by order; the scores are continuous)."""
    r = np.empty(len(p))
    r[np.argsort(p, kind="mergesort")] = np.arange(1, len(p) + 1)
    n1 = y.sum()
    n0 = len(y) - n1
    return float((r[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def load(data: Path):
    tr = pq.read_table(data / "train.parquet").to_pydict()
    va = pq.read_table(data / "valid.parquet").to_pydict()
    fields = [c for c in tr if c != "label"]
    off, xtr, xva, sizes = 0, [], [], []
    for c in fields:
        vocab = {v: i + 1 for i, v in enumerate(sorted(set(tr[c])))}  # row 0: unseen
        xtr.append(np.array([vocab[v] for v in tr[c]], dtype=np.int64) + off)
        xva.append(np.array([vocab.get(v, 0) for v in va[c]], dtype=np.int64) + off)
        sizes.append(len(vocab) + 1)
        off += len(vocab) + 1
    ytr = torch.tensor(np.array(tr["label"]), dtype=torch.float32)
    return (torch.tensor(np.stack(xtr, 1)), ytr, torch.tensor(np.stack(xva, 1)),
            np.array(va["label"]), sizes)  # fmt: skip


class MLP(nn.Module):
    def __init__(self, rows: int, fields: int, a):
        super().__init__()
        self.emb = nn.Embedding(rows, a.emb)
        layers, d = [], fields * a.emb
        for h in a.hidden:
            layers += [nn.Linear(d, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Dropout(a.dropout)]
            d = h
        self.mlp = nn.Sequential(*layers, nn.Linear(d, 1))

    def forward(self, x):
        return self.mlp(self.emb(x).flatten(1)).squeeze(1)


class RankMixer(nn.Module):
    """Slices tokenizer (T slices of the concat, one projection per token to D), L post-LN
    blocks of TokenMixing (H = T) + per-token GELU FFN (k = 4), mean pooling, MLP head."""

    def __init__(self, rows: int, fields: int, a):
        super().__init__()
        self.emb = nn.Embedding(rows, a.emb)
        T, D, w = a.tokens, a.dim, fields * a.emb
        self.T, self.D, self.s = T, D, w // T
        assert w % T == 0 and D % T == 0
        self.proj = nn.Parameter(torch.randn(T, self.s, D) / self.s**0.5)
        self.pb = nn.Parameter(torch.zeros(T, D))
        self.blocks = nn.ModuleList()
        for _ in range(a.layers):
            b = nn.Module()
            b.n1, b.n2 = nn.LayerNorm(D), nn.LayerNorm(D)
            b.w1 = nn.Parameter(torch.randn(T, D, 4 * D) / D**0.5)
            b.b1 = nn.Parameter(torch.zeros(T, 4 * D))
            b.w2 = nn.Parameter(torch.randn(T, 4 * D, D) / (4 * D) ** 0.5)
            b.b2 = nn.Parameter(torch.zeros(T, D))
            self.blocks.append(b)
        layers, d = [], D
        for h in a.hidden:
            layers += [nn.Linear(d, h), nn.ReLU(), nn.Dropout(a.dropout)]
            d = h
        self.head = nn.Sequential(nn.Dropout(a.dropout), *layers, nn.Linear(d, 1))

    def forward(self, x):
        B, T, D = x.shape[0], self.T, self.D
        h = torch.einsum("bts,tsd->btd", self.emb(x).flatten(1).view(B, T, self.s), self.proj)
        h = h + self.pb
        for b in self.blocks:
            mixed = h.view(B, T, T, D // T).transpose(1, 2).reshape(B, T, D)
            h = b.n1(mixed + h)
            f = F.gelu(torch.einsum("btd,tdk->btk", h, b.w1) + b.b1)
            h = b.n2(h + torch.einsum("btk,tkd->btd", f, b.w2) + b.b2)
        return self.head(h.mean(1)).squeeze(1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["mlp", "rankmixer"], default="mlp")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--emb", type=int, default=10, help="embedding dim of every field")
    p.add_argument("--hidden", type=lambda s: [int(x) for x in s.split(",") if x], default=None,
                   help="MLP widths (mlp: 400,400,400; rankmixer head: 256,128)")  # fmt: skip
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--reg", type=float, default=0.05, help="L2 on the whole embedding table")
    p.add_argument("--init", choices=["small", "torchrec"], default="small",
                   help="small: N(0, 1e-4); torchrec: U(+-sqrt(1/rows)) per field")  # fmt: skip
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--patience", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="0: torch's default")
    a = p.parse_args(argv)
    if a.hidden is None:
        a.hidden = [400, 400, 400] if a.model == "mlp" else [256, 128]
    torch.manual_seed(a.seed)
    if a.threads:
        torch.set_num_threads(a.threads)
    xtr, ytr, xva, yva, sizes = load(a.data)
    model = (MLP if a.model == "mlp" else RankMixer)(sum(sizes), len(sizes), a)
    with torch.no_grad():
        if a.init == "small":
            nn.init.normal_(model.emb.weight, std=1e-4)
        else:
            for start, n in zip(np.cumsum([0, *sizes[:-1]]), sizes, strict=True):
                model.emb.weight[start : start + n].uniform_(-((1 / n) ** 0.5), (1 / n) ** 0.5)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    best, bad, lr, t0, n = 0.0, 0, a.lr, time.time(), len(ytr)
    for epoch in range(1, a.epochs + 1):
        model.train()
        perm = torch.randperm(n)
        for i in range(0, n, a.batch):
            idx = perm[i : i + a.batch]
            loss = F.binary_cross_entropy_with_logits(model(xtr[idx]), ytr[idx])
            loss = loss + a.reg / 2 * model.emb.weight.pow(2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            pred = torch.cat([torch.sigmoid(model(xva[i : i + 16384]))
                              for i in range(0, len(yva), 16384)]).numpy()  # fmt: skip
        score = auc(yva, pred)
        rate = epoch * n / (time.time() - t0)
        print(f"epoch {epoch}: valid AUC {score:.4f}  lr {lr:g}  {rate:,.0f} samples/s  "
              f"{time.time() - t0:.0f} s", flush=True)  # fmt: skip
        if score > best:
            best, bad = score, 0
            continue
        bad += 1
        if bad >= a.patience:
            break
        lr /= 10
        for g in opt.param_groups:
            g["lr"] = lr
    print(f"best valid AUC {best:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
