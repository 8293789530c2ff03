"""The recommended configs are the table's best rows (docs/RESULTS.md), and every Frappe config
runs the recipe the results page says it does."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from benchmarks.quality import ARCHS, recipe_name
from ranking.train.config import load_experiment

REPO = Path(__file__).resolve().parents[1]


def _parsed(name: str) -> dict:
    d = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    d.pop("name")
    return d


def test_frappe_best_is_the_rankmixer_row():
    assert _parsed("frappe_best") == _parsed("frappe_rankmixer")


@pytest.mark.parametrize("arch", ARCHS)
def test_frappe_recipes_are_the_documented_ones(arch):
    exp = load_experiment(REPO / "configs" / f"frappe_{arch}.yaml", require_data=False)
    want = "B" if arch == "rankmixer" else "A"
    assert recipe_name(exp) == want
    if want == "B":
        assert exp.model.embedding_init_scale > 0 and exp.data.batch_size == 2048
        assert {t.dim for t in exp.schema.tables} == {32}
    else:
        assert exp.model.embedding_init_scale == 0 and exp.data.batch_size == 512
        assert exp.train.epochs == 6
