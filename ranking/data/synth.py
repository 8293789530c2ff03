"""Synthetic data in a preset's schema, with a planted signal made of feature interactions.

Each categorical value ``v`` of field ``f`` has a hidden vector ``u_f[v]`` (rank ``RANK``) and a
hidden bias ``b_f[v]``; an id list uses the mean of its elements' vectors. A row's logit is

    logit = a * sum_{f < g} <u_f, u_g>  +  c * sum_f b_f  +  dense term  +  bias

with ``a`` and ``c`` scaled so that the pairwise part dominates (std ~2 vs ~0.7) and ``bias`` set
by bisection for a ~30% positive rate; the label is drawn from ``sigmoid(logit)``. A logistic
regression on one-hot features sees only the first-order part, so a model with interactions
beats it. Ids are Zipf-distributed (exponent ``ZIPF``). Rows are generated and written in chunks.

Drift (the continuous-training loop's days): with ``drift > 0``, day ``d``'s hidden vectors and
biases are ``cos(drift * d) * x + sin(drift * d) * x'``, with ``x'`` an independent draw of the
same shape, so the signal moves a little each day (the correlation between day 0's and day
``d``'s logits falls as ``cos(drift * d)`` for the pairwise and first-order parts) while the
value names and their frequencies stay. ``click_probability`` gives the planted probability of
any rows with the preset's columns (e.g. logged requests), for simulating their outcomes.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

RANK = 4
ZIPF = 1.1
TARGET_RATE = 0.30
PAIR_STD, FIRST_STD, DENSE_STD = 2.0, 0.7, 0.4

DAYTIME = ["morning", "afternoon", "evening", "night", "noon", "sunrise", "sunset"]
WEEKDAY = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
WEATHER = ["sunny", "cloudy", "rainy", "snowy", "foggy", "drizzle", "stormy", "sleet", "unknown"]
OCCUPATIONS = [
    "administrator", "artist", "doctor", "educator", "engineer", "entertainment", "executive",
    "healthcare", "homemaker", "lawyer", "librarian", "marketing", "none", "other",
    "programmer", "retired", "salesman", "scientist", "student", "technician", "writer",
]  # fmt: skip
GENRES = [
    "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western", "unknown",
]  # fmt: skip
CRITEO_CARD = [
    1400, 550, 200000, 100000, 300, 24, 12000, 630, 3, 90000, 5600, 180000, 3200,
    27, 14000, 150000, 10, 5300, 2100, 4, 170000, 17, 15, 60000, 100, 50000,
]  # fmt: skip


@dataclass
class Field:
    """One synthetic column: ``card`` distinct values named by ``names`` (an Arrow array) or by
    their integer id (``as_int``); ``kind`` is categorical, id_list or dense."""

    column: str
    kind: str
    card: int = 0
    names: pa.Array | None = None
    as_int: bool = False
    arrow_type: pa.DataType | None = None


def preset_fields(preset: str) -> list[Field]:
    """The columns of a preset, matching ``configs/schemas/<preset>.yaml`` (plus extras that
    the real files carry, e.g. MovieLens ``timestamp``)."""

    def names(vals) -> pa.Array:
        return pa.array([str(v) for v in vals], pa.string())

    if preset == "frappe":
        return [
            Field("user", "categorical", 957, names(range(957))),
            Field("item", "categorical", 4082, names(range(4082))),
            Field("daytime", "categorical", 7, names(DAYTIME)),
            Field("weekday", "categorical", 7, names(WEEKDAY)),
            Field("isweekend", "categorical", 2, names(["workday", "weekend"])),
            Field("homework", "categorical", 3, names(["unknown", "home", "work"])),
            Field("cost", "categorical", 2, names(["free", "paid"])),
            Field("weather", "categorical", 9, names(WEATHER)),
            Field("country", "categorical", 80, names(f"country{i}" for i in range(80))),
            Field("city", "categorical", 233, names(range(233))),
        ]
    if preset == "movielens":
        return [
            Field("user_id", "categorical", 943, names(range(1, 944))),
            Field("item_id", "categorical", 1682, names(range(1, 1683))),
            Field("age", "categorical", 67, names(range(7, 74)), as_int=True, arrow_type=pa.int16()),
            Field("gender", "categorical", 2, names(["M", "F"])),
            Field("occupation", "categorical", 21, names(OCCUPATIONS)),
            Field("zip_code", "categorical", 795, names(f"{10000 + 97 * i:05d}" for i in range(795))),
            Field("release_year", "categorical", 72, names(range(1927, 1999))),
            Field("genres", "id_list", 19, names(GENRES)),
            Field("hour_of_day", "categorical", 24, names(range(24)), as_int=True, arrow_type=pa.int8()),
        ]  # fmt: skip
    if preset == "criteo":
        dense = [Field(f"I{i}", "dense") for i in range(1, 14)]
        cats = [Field(f"C{i}", "categorical", c, None) for i, c in enumerate(CRITEO_CARD, 1)]
        return dense + cats
    if preset == "criteo_large":
        return large_fields()
    raise ValueError(
        f"unknown preset {preset!r} (expected criteo, criteo_large, frappe or movielens)"
    )


class Generator:
    """Draws chunks of rows for one preset.

    The hidden signal (per-value vectors, biases, value names, calibration) is fixed by
    ``signal_seed``; the rows drawn from it by ``seed``. Train and validation splits are the same
    signal with different ``seed``s.
    """

    def __init__(
        self, preset: str, seed: int = 0, signal_seed: int = 0, day: int = 0, drift: float = 0.0
    ):
        self.preset = preset
        self.seed = seed
        self.signal_seed = signal_seed
        self.day, self.drift = day, drift
        self.fields = preset_fields(preset)
        rng = np.random.default_rng([signal_seed, 1])
        alt = np.random.default_rng([signal_seed, 7])  # where the signal drifts to
        angle = drift * day
        self.hidden = {}
        for f in self.fields:
            if f.kind == "dense":
                self.hidden[f.column] = (rng.uniform(0.5, 3.0), rng.uniform(0.5, 1.5), rng.normal())
                continue
            if f.names is None:  # criteo-style 8-hex-digit values
                f.names = pa.array(
                    [f"{x:08x}" for x in rng.integers(0, 2**32, f.card)], pa.string()
                )
            vec = rng.normal(size=(f.card, RANK)) / np.sqrt(RANK)
            bias = rng.normal(size=f.card)
            if angle:
                vec2 = alt.normal(size=(f.card, RANK)) / np.sqrt(RANK)
                bias2 = alt.normal(size=f.card)
                vec = np.cos(angle) * vec + np.sin(angle) * vec2
                bias = np.cos(angle) * bias + np.sin(angle) * bias2
            cdf = np.cumsum(1.0 / np.arange(1, f.card + 1) ** ZIPF)
            perm = rng.permutation(f.card)  # which value is the most frequent
            self.hidden[f.column] = (vec, bias, cdf / cdf[-1], perm)
        self.scale = (1.0, 1.0, 1.0)
        self.bias = 0.0
        self._calibrate()

    def _calibrate(self, n: int = 50000) -> None:
        _, parts = self._draw(np.random.default_rng([self.signal_seed, 2]), n)
        pair, first, dense = parts
        self.scale = (
            PAIR_STD / max(pair.std(), 1e-9),
            FIRST_STD / max(first.std(), 1e-9),
            DENSE_STD / max(dense.std(), 1e-9) if dense.any() else 0.0,
        )
        base = self.scale[0] * pair + self.scale[1] * first + self.scale[2] * dense
        lo, hi = -20.0, 20.0
        for _ in range(60):
            mid = (lo + hi) / 2
            rate = (1 / (1 + np.exp(-(base + mid)))).mean()
            lo, hi = (mid, hi) if rate < TARGET_RATE else (lo, mid)
        self.bias = (lo + hi) / 2

    def _draw(self, rng: np.random.Generator, n: int):
        """``n`` rows: (Arrow columns dict, (pairwise ``[n]``, first-order ``[n]``, dense ``[n]``))."""
        cols: dict[str, pa.Array] = {}
        vec_sum = np.zeros((n, RANK))
        sq_sum = np.zeros(n)
        first = np.zeros(n)
        dense = np.zeros(n)
        for f in self.fields:
            h = self.hidden[f.column]
            if f.kind == "dense":
                cols[f.column], contribution = _dense_column(rng, n, h)
                dense += contribution
                continue
            vec, bias, cdf, perm = h
            if f.kind == "id_list":
                lens = rng.integers(1, 4, n)
                flat = perm[np.searchsorted(cdf, rng.random(int(lens.sum())))]
                starts = np.cumsum(lens) - lens
                u = np.add.reduceat(vec[flat], starts, axis=0) / lens[:, None]
                b = np.add.reduceat(bias[flat], starts) / lens
                offsets = pa.array(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
                cols[f.column] = pa.ListArray.from_arrays(offsets, f.names.take(pa.array(flat)))
            else:
                ids = perm[np.searchsorted(cdf, rng.random(n))]
                u, b = vec[ids], bias[ids]
                if f.as_int:
                    vals = pa.array(np.asarray(f.names.to_pylist(), dtype=np.int64)[ids])
                    cols[f.column] = vals.cast(f.arrow_type)
                else:
                    cols[f.column] = f.names.take(pa.array(ids))
            vec_sum += u
            sq_sum += (u * u).sum(1)
            first += b
        pair = 0.5 * ((vec_sum * vec_sum).sum(1) - sq_sum)
        return cols, (pair, first, dense)

    def click_probability(self, table: pa.Table) -> np.ndarray:
        """The planted probability of each row of ``table`` (the preset's columns, values as
        strings or integers as written; a null or unknown value adds nothing)."""
        n = table.num_rows
        vec_sum, sq_sum = np.zeros((n, RANK)), np.zeros(n)
        first, dense = np.zeros(n), np.zeros(n)
        for f in self.fields:
            if f.column not in table.column_names:
                continue
            col = table[f.column]
            h = self.hidden[f.column]
            if f.kind == "dense":
                mu, sigma, w = h
                x = col.to_numpy(zero_copy_only=False).astype(float)
                z = (np.log1p(np.maximum(np.nan_to_num(x, nan=0.0), 0)) - mu) / sigma
                dense += np.where(np.isnan(x), 0.0, w * z)
                continue
            vec, bias = h[0], h[1]
            index = {v: i for i, v in enumerate(f.names.to_pylist())}
            if f.kind == "id_list":
                u, b = np.zeros((n, RANK)), np.zeros(n)
                for r, lst in enumerate(col.to_pylist()):
                    if lst:
                        uu, bb = _hidden_of(lst, index, vec, bias)
                        u[r], b[r] = uu.mean(0), bb.mean()
            else:
                u, b = _hidden_of(col.to_pylist(), index, vec, bias)
            vec_sum += u
            sq_sum += (u * u).sum(1)
            first += b
        pair = 0.5 * ((vec_sum * vec_sum).sum(1) - sq_sum)
        logit = self.scale[0] * pair + self.scale[1] * first + self.scale[2] * dense + self.bias
        return 1 / (1 + np.exp(-logit))

    def chunk(self, index: int, n: int) -> pa.Table:
        """Chunk ``index`` of ``n`` rows (deterministic in ``seed``, ``index`` and ``n``)."""
        rng = np.random.default_rng([self.seed, 3, index])
        cols, (pair, first, dense) = self._draw(rng, n)
        logit = self.scale[0] * pair + self.scale[1] * first + self.scale[2] * dense + self.bias
        label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int8)
        return pa.table({"label": pa.array(label), **cols})


def write_synthetic(
    preset: str,
    rows: int,
    out: str | Path,
    seed: int = 0,
    chunk_rows: int = 262144,
    signal_seed: int = 0,
    chunks_per_file: int = 8,
    progress: bool = True,
    day: int = 0,
    drift: float = 0.0,
    id_range: int = 0,
) -> list[Path]:
    """Write ``rows`` synthetic rows as ``out/part-NNNNN.parquet`` (one row group per chunk);
    memory is bounded by one chunk. Prints a progress line (rows/s, ETA) on stderr.
    ``id_range``: the ``criteo_large`` preset's id range of its big field (0: ``LARGE_ID_RANGE``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if preset == "sequence":
        gen = SequenceGenerator(seed, signal_seed)
    elif preset == "criteo_large":
        if drift:
            raise ValueError("--drift: not supported by the criteo_large preset")
        gen = LargeGenerator(seed, signal_seed, id_range=id_range)
    else:
        gen = Generator(preset, seed, signal_seed, day=day, drift=drift)
    files: list[Path] = []
    writer = None
    done, t0 = 0, time.perf_counter()
    nchunks = -(-rows // chunk_rows)
    for i in range(nchunks):
        n = min(chunk_rows, rows - done)
        table = gen.chunk(i, n)
        if i % chunks_per_file == 0:
            if writer is not None:
                writer.close()
            files.append(out / f"part-{len(files):05d}.parquet")
            writer = pq.ParquetWriter(files[-1], table.schema, compression="zstd")
        writer.write_table(table, row_group_size=chunk_rows)
        done += n
        if progress:
            el = time.perf_counter() - t0
            rate = done / max(el, 1e-9)
            print(
                f"\rsynth {preset}: {done:,}/{rows:,} rows ({100 * done / rows:.0f}%), "
                f"{rate:,.0f} rows/s, ETA {(rows - done) / rate:.0f} s   ",
                end="", file=sys.stderr, flush=True,
            )  # fmt: skip
    if writer is not None:
        writer.close()
    if progress:
        print(file=sys.stderr)
    return files


# ------------------------------------------------------------------------- the sequence preset
SEQ_USERS, SEQ_ITEMS, SEQ_CATEGORIES, SEQ_MAX_LENGTH = 3000, 2000, 20, 30
SEQ_CLICK_RATE = 0.30


class SequenceGenerator:
    """The ``sequence`` preset: a candidate scored against the user's behaviour history.

    Columns: ``user``, ``item``, ``item_cat`` (categoricals), ``item_hist`` (the user's past
    items, most recent first, 5 to 30), ``act_hist`` (the action on each: 0 viewed, 1 liked,
    aligned with ``item_hist``), and the labels ``click`` and ``conversion``.

    Each user has 3 favourite categories; half of the history's items come from them, the rest
    uniformly from ``SEQ_CATEGORIES`` categories (items are skewed within a category). Half of
    the candidates are an item of the history (re-engagement), the rest are drawn as the
    history's items are. The planted signal is a match between the candidate and the history::

        match = max_j [item_hist[j] == item] * (1 if act_hist[j] == 1 else 0.3) * 0.9 ** j
        click_logit = 4 * match + 0.6 * b_item + 0.4 * b_user + bias_click
        conversion = click * Bernoulli(sigmoid(2.5 * match + 0.8 * b_item + bias_conv))

    The match needs the pairing of the history's items with their own actions and positions,
    and a maximum over the history: a mean over the history (``pool``) keeps the mixture of
    items and the mixture of actions, so attention of the candidate over the history can beat
    it. A conversion needs a click, so the two tasks are correlated.
    """

    def __init__(self, seed: int = 0, signal_seed: int = 0):
        self.seed, self.signal_seed = seed, signal_seed
        rng = np.random.default_rng([signal_seed, 11])
        self.cat_of = rng.integers(0, SEQ_CATEGORIES, SEQ_ITEMS)
        self.items_of = [np.flatnonzero(self.cat_of == c) for c in range(SEQ_CATEGORIES)]
        self.b_item = rng.normal(size=SEQ_ITEMS)
        self.b_user = rng.normal(size=SEQ_USERS)
        self.favourites = np.stack(
            [rng.choice(SEQ_CATEGORIES, 3, replace=False) for _ in range(SEQ_USERS)]
        )
        self.user_cdf = _zipf_cdf(SEQ_USERS, 0.8)
        self.bias_click, self.bias_conv = 0.0, 0.0
        _, _, click_part, conv_part = self._draw(np.random.default_rng([signal_seed, 12]), 50000)
        self.bias_click = _bisect_bias(click_part, SEQ_CLICK_RATE)
        self.bias_conv = _bisect_bias(conv_part, 0.35)

    def _item_in(self, rng, cats: np.ndarray) -> np.ndarray:
        """One item per entry of ``cats``: Zipf-like within the category (lower index, more
        popular)."""
        out = np.empty(len(cats), dtype=np.int64)
        for c in np.unique(cats):
            where = np.flatnonzero(cats == c)
            pool = self.items_of[c]
            r = rng.random(len(where)) ** 2  # skewed towards the category's first items
            out[where] = pool[(r * len(pool)).astype(np.int64)]
        return out

    def _categories(self, rng, users: np.ndarray, n: int) -> np.ndarray:
        fav = self.favourites[users, rng.integers(0, 3, n)]
        return np.where(rng.random(n) < 0.5, fav, rng.integers(0, SEQ_CATEGORIES, n))

    def _draw(self, rng: np.random.Generator, n: int):
        users = np.searchsorted(self.user_cdf, rng.random(n))
        lens = rng.integers(5, SEQ_MAX_LENGTH + 1, n)
        owner = np.repeat(np.arange(n), lens)
        hist = self._item_in(rng, self._categories(rng, users[owner], int(lens.sum())))
        acts = (rng.random(len(hist)) < 0.3).astype(np.int64)
        items = self._item_in(rng, self._categories(rng, users, n))
        starts = np.cumsum(lens) - lens
        again = hist[starts + (rng.random(n) * lens).astype(np.int64)]
        items = np.where(rng.random(n) < 0.5, again, items)
        pos = np.arange(len(hist)) - np.repeat(starts, lens)
        w = (hist == items[owner]) * np.where(acts == 1, 1.0, 0.3) * 0.9**pos
        match = np.zeros(n)
        np.maximum.at(match, owner, w)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
        cols = {
            "user": pa.array(users),
            "item": pa.array(items),
            "item_cat": pa.array(self.cat_of[items]),
            "item_hist": pa.ListArray.from_arrays(offsets, pa.array(hist)),
            "act_hist": pa.ListArray.from_arrays(offsets, pa.array(acts)),
        }
        click = 4.0 * match + 0.6 * self.b_item[items] + 0.4 * self.b_user[users]
        conv = 2.5 * match + 0.8 * self.b_item[items]
        return cols, match, click, conv

    def chunk(self, index: int, n: int) -> pa.Table:
        """Chunk ``index`` of ``n`` rows (deterministic in ``seed``, ``index`` and ``n``)."""
        rng = np.random.default_rng([self.seed, 13, index])
        cols, _, click, conv = self._draw(rng, n)
        clicked = rng.random(n) < _sigmoid(click + self.bias_click)
        converted = clicked & (rng.random(n) < _sigmoid(conv + self.bias_conv))
        return pa.table(
            {
                "click": pa.array(clicked.astype(np.int8)),
                "conversion": pa.array(converted.astype(np.int8)),
                **cols,
            }
        )


def _hidden_of(values: list, index: dict, vec: np.ndarray, bias: np.ndarray):
    """The hidden vectors ``[n, RANK]`` and biases ``[n]`` of ``values`` (zeros for a null or
    unknown value)."""
    ix = np.array([index.get(str(v), -1) if v is not None else -1 for v in values], np.int64)
    ok = ix >= 0
    safe = np.maximum(ix, 0)
    return np.where(ok[:, None], vec[safe], 0.0), np.where(ok, bias[safe], 0.0)


def _dense_column(rng: np.random.Generator, n: int, hidden) -> tuple[pa.Array, np.ndarray]:
    """A count column (log-normal, 20% nulls) and its term of the planted logit."""
    mu, sigma, w = hidden
    x = np.floor(np.exp(rng.normal(mu, sigma, n))) - 1
    z = (np.log1p(np.maximum(x, 0)) - mu) / sigma
    return pa.array(x.astype(np.int64), mask=rng.random(n) < 0.2), w * z


def _zipf_cdf(n: int, a: float) -> np.ndarray:
    cdf = np.cumsum(1.0 / np.arange(1, n + 1) ** a)
    return cdf / cdf[-1]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def _bisect_bias(logit: np.ndarray, rate: float) -> float:
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _sigmoid(logit + mid).mean() < rate else (lo, mid)
    return (lo + hi) / 2


# ------------------------------------------------------------------- the criteo_large preset
LARGE_ID_RANGE = 10**8
LARGE_FIELD = "C3"  # the big field: Zipf ids over the whole id range
LARGE_MATERIALIZE = 1 << 20  # fields up to this many values keep their hidden values in arrays
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def large_fields(id_range: int = LARGE_ID_RANGE) -> list[Field]:
    """The ``criteo_large`` columns: Criteo's 13 counts and 26 categoricals, integer ids
    (``C3`` over ``id_range`` values; the other fields at Criteo-like cardinalities, capped at
    ``id_range``), written as int64."""
    dense = [Field(f"I{i}", "dense") for i in range(1, 14)]
    cats = []
    for i, c in enumerate(CRITEO_CARD, 1):
        card = id_range if f"C{i}" == LARGE_FIELD else min(c, id_range)
        cats.append(Field(f"C{i}", "categorical", card, None, as_int=True))
    return dense + cats


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function of ``x`` (uint64, wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return z ^ (z >> np.uint64(31))


def hashed_hidden(ids: np.ndarray, salt: int) -> tuple[np.ndarray, np.ndarray]:
    """The hidden vectors ``[n, RANK]`` and biases ``[n]`` of integer ``ids`` of one field,
    derived from a hash of (``salt``, id): three SplitMix64 draws give six uniforms, Box-Muller
    turns them into six standard normals, of which RANK make the vector (scaled by
    ``1/sqrt(RANK)``) and one the bias. Nothing per value is stored."""
    key = splitmix64(ids.astype(np.uint64) ^ np.uint64(salt))
    normals = []
    for j in range(3):
        with np.errstate(over="ignore"):
            h = splitmix64(key + np.uint64(j + 1) * np.uint64(0xD1B54A32D192ED03))
        u1 = ((h >> np.uint64(40)).astype(np.float64) + 0.5) / float(1 << 24)
        u2 = ((h & np.uint64(0xFFFFFF)).astype(np.float64) + 0.5) / float(1 << 24)
        r = np.sqrt(-2.0 * np.log(u1))
        normals += [r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)]
    vec = np.stack(normals[:RANK], 1) / np.sqrt(RANK)
    return vec, normals[RANK]


def zipf_ids(rng: np.random.Generator, n: int, card: int, mult: int, shift: int) -> np.ndarray:
    """``n`` ids in ``[0, card)``: a Zipf-like rank (continuous power law of exponent ``ZIPF``
    over ``[1, card + 1)``, by its inverse CDF, floored) mapped to an id by the bijection
    ``(mult * (rank - 1) + shift) mod card`` (``mult`` coprime to ``card``), so the most
    frequent ids are scattered over the range. No per-value table."""
    e = 1.0 - ZIPF
    top = (card + 1.0) ** e
    x = (1.0 - rng.random(n) * (1.0 - top)) ** (1.0 / e)
    rank = np.minimum(np.floor(x).astype(np.int64), card) - 1
    return (rank * mult + shift) % card


def _packed(vec: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return np.column_stack([vec, bias, (vec * vec).sum(1)])


class LargeGenerator(Generator):
    """The ``criteo_large`` preset: Criteo-shaped rows whose big field ``C3`` draws Zipf ids
    over ``id_range`` values (up to 10^8 and beyond) in bounded memory.

    The planted signal is ``Generator``'s (pairwise interactions of rank-``RANK`` hidden vectors,
    first-order biases, the dense counts), but each value's hidden vector and bias come from a
    hash of the field and the id (``hashed_hidden``) instead of a table of ``card`` rows; fields
    of at most ``LARGE_MATERIALIZE`` values keep the same hashed values in arrays (faster).
    Ids are written as int64."""

    def __init__(self, seed: int = 0, signal_seed: int = 0, id_range: int = 0):
        self.preset = "criteo_large"
        self.seed, self.signal_seed = seed, signal_seed
        self.day, self.drift = 0, 0.0
        self.id_range = int(id_range or LARGE_ID_RANGE)
        if self.id_range < 2:
            raise ValueError(f"id_range: expected at least 2, got {self.id_range}")
        self.fields = large_fields(self.id_range)
        rng = np.random.default_rng([signal_seed, 21])
        self.hidden = {}
        for f in self.fields:
            if f.kind == "dense":
                self.hidden[f.column] = (rng.uniform(0.5, 3.0), rng.uniform(0.5, 1.5), rng.normal())
                continue
            salt = int(rng.integers(0, 2**63))
            mult = int(rng.integers(1, 2**31)) | 1
            while np.gcd(mult, f.card) != 1:
                mult += 2
            shift = int(rng.integers(0, f.card))
            table = None
            if f.card <= LARGE_MATERIALIZE:
                table = _packed(*hashed_hidden(np.arange(f.card), salt))
            self.hidden[f.column] = (salt, mult, shift, table)
        self.scale = (1.0, 1.0, 1.0)
        self.bias = 0.0
        self._calibrate()

    def _hidden(self, column: str, ids: np.ndarray) -> np.ndarray:
        """``[n, RANK + 2]``: each id's hidden vector, bias and squared vector norm."""
        salt, _, _, table = self.hidden[column]
        if table is not None:
            return table[ids]
        return _packed(*hashed_hidden(ids, salt))

    def _draw(self, rng: np.random.Generator, n: int):
        cols: dict[str, pa.Array] = {}
        vec_sum = np.zeros((n, RANK))
        sq_sum = np.zeros(n)
        first = np.zeros(n)
        dense = np.zeros(n)
        for f in self.fields:
            h = self.hidden[f.column]
            if f.kind == "dense":
                cols[f.column], contribution = _dense_column(rng, n, h)
                dense += contribution
                continue
            _, mult, shift, _ = h
            ids = zipf_ids(rng, n, f.card, mult, shift)
            g = self._hidden(f.column, ids)
            cols[f.column] = pa.array(ids)
            vec_sum += g[:, :RANK]
            first += g[:, RANK]
            sq_sum += g[:, RANK + 1]
        pair = 0.5 * ((vec_sum * vec_sum).sum(1) - sq_sum)
        return cols, (pair, first, dense)

    def click_probability(self, table: pa.Table) -> np.ndarray:
        """The planted probability of each row of ``table`` (a null or out-of-range id adds
        nothing)."""
        n = table.num_rows
        vec_sum, sq_sum = np.zeros((n, RANK)), np.zeros(n)
        first, dense = np.zeros(n), np.zeros(n)
        for f in self.fields:
            if f.column not in table.column_names:
                continue
            col = table[f.column]
            if f.kind == "dense":
                mu, sigma, w = self.hidden[f.column]
                x = col.to_numpy(zero_copy_only=False).astype(float)
                z = (np.log1p(np.maximum(np.nan_to_num(x, nan=0.0), 0)) - mu) / sigma
                dense += np.where(np.isnan(x), 0.0, w * z)
                continue
            x = col.to_numpy(zero_copy_only=False).astype(float)
            ok = ~np.isnan(x) & (x >= 0) & (x < f.card)
            g = self._hidden(f.column, np.where(ok, x, 0).astype(np.int64))
            g = np.where(ok[:, None], g, 0.0)
            vec_sum += g[:, :RANK]
            first += g[:, RANK]
            sq_sum += g[:, RANK + 1]
        pair = 0.5 * ((vec_sum * vec_sum).sum(1) - sq_sum)
        logit = self.scale[0] * pair + self.scale[1] * first + self.scale[2] * dense + self.bias
        return 1 / (1 + np.exp(-logit))
