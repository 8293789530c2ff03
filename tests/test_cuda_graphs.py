"""``inference.cuda_graphs`` (``ranking.lowered.CudaGraphs``): the row buckets, the padding and
slicing around the graph (checked here with ``capture=False``: the same path with the padded
forward in place of a replay), and the eager fallback when a capture fails. The capture itself
runs on a GPU (benchmarks/gpu_check.sh: ``bench stack``'s ``fp8+graphs`` rows)."""

from __future__ import annotations

import logging

import pytest
import torch
from test_inference import _model

from ranking.inference import InferenceConfig, InferenceRanker, optimize_for_inference
from ranking.lowered import CudaGraphs
from ranking.model.synthetic import random_batch


def test_buckets_are_powers_of_two_up_to_the_limit():
    g = CudaGraphs(lambda x: x, max_rows=1024, capture=False)
    assert [g.bucket(n) for n in (1, 16, 17, 100, 512, 513, 1024)] == [
        16, 16, 32, 128, 512, 1024, 1024,
    ]  # fmt: skip
    assert g.bucket(1025) is None


@pytest.mark.parametrize("name", ["rankmixer", "tokenmixer_large"])
def test_padded_buckets_give_the_eager_rows(name):
    """Every row of a padded bucket's output is the row computed alone: padding rows (zeros)
    never reach the real ones, and only the real rows come back."""
    model, schema = _model(name)
    fast = optimize_for_inference(model, dtype="fp32")
    assert isinstance(fast, InferenceRanker)
    graphs = CudaGraphs(fast._dense_part, max_rows=64, capture=False)
    for rows in (5, 16, 40, 64, 70):
        batch = random_batch(schema, rows, seed=rows)
        tokens = fast.tokenizer(batch.dense, batch.sparse, batch.sequences, batch.seq_of)
        want, _ = fast._dense_part(tokens)
        got, _ = graphs(tokens)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert sorted(graphs.graphs) == [16, 64]  # 5 and 16 share a bucket; 70 ran eagerly


def test_a_failed_capture_falls_back_to_eager_once(caplog):
    calls = []

    def fn(x):
        calls.append(x.shape[0])
        return x * 2

    g = CudaGraphs(fn, capture=True)  # no GPU here: making the capture stream fails
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the capture would succeed")
    x = torch.arange(6.0).view(3, 2)
    with caplog.at_level(logging.WARNING):
        assert torch.equal(g(x), x * 2)
        assert torch.equal(g(x), x * 2)
    assert g.failed and calls == [3, 3]
    assert sum("CUDA graph capture failed" in r.message for r in caplog.records) == 1


def test_cuda_graphs_is_an_inference_option_ignored_off_the_gpu():
    cfg = InferenceConfig.from_dict({"cuda_graphs": True})
    model, schema = _model("rankmixer")
    fast = optimize_for_inference(model, dtype="fp32", **cfg.options())
    assert fast.graphs is None  # the CPU: ignored (logged once)
    batch = random_batch(schema, 8, seed=1)
    want = optimize_for_inference(model, dtype="fp32")(batch).logits
    torch.testing.assert_close(fast(batch).logits, want)
