"""``optimize_for_inference``: the lowered model equals the eager one for every architecture; its
fast blocks (``ranking.lowered``; their equations: tests/test_model_blocks.py); the ``inference:`` section;
artifacts exported before the architecture / runtime split still load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_model_blocks import SMALL as BLOCK_MODELS

from ranking.inference import InferenceConfig, InferenceRanker, optimize_for_inference
from ranking.lowered import (
    EPILOGUES,
    TokenMajorRankMixer,
    TokenMajorStack,
    TokenMajorTokenMixerLarge,
    mix_tm,
    revert_tm,
)
from ranking.model.blocks import build_stack
from ranking.model.config import ConfigError, ModelConfig
from ranking.model.ranker import build_model
from ranking.model.synthetic import random_batch, toy_schema

CPU = torch.device("cpu")

# one small model per architecture and stage kind (dense / MoE): test_model_blocks' models, and
# two more shapes of the token-major path (T = 1 with RMSNorm; the reverted residual, L = 4)
SMALL = {
    **BLOCK_MODELS,
    "rankmixer_rms_t1": {
        "arch": "rankmixer",
        "dim": 8,
        "num_tokens": 1,
        "norm": "rms",
        "dense_token": False,
    },
    "tokenmixer_large_reverted": {
        "arch": "tokenmixer_large",
        "dim": 16,
        "num_heads": 2,
        "tokenmixer_large": {"second_residual": "reverted"},
        "num_layers": 4,
        "down_init_scale": 1.0,
    },
}
TOKEN_MAJOR = {"rankmixer", "rankmixer_rms_t1", "tokenmixer_large", "tokenmixer_large_reverted"}


def _model(name: str, num_tasks: int = 2):
    schema = toy_schema(num_tasks=num_tasks)
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict(SMALL[name]), schema).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith(("b1", "b2")):
                p.add_(torch.randn_like(p) * 0.3)
    return model, schema


# ----------------------------------------------------------------------------- whole models


@pytest.mark.parametrize("name", list(SMALL))
@pytest.mark.parametrize("micro_batch", [0, 16])
def test_lowered_model_equals_eager(name, micro_batch):
    """For every architecture: fp32 lowering equals the eager forward to float rounding, bf16
    stays within the tolerance the bf16 tests always used; the eager model is left as it was and
    shares only its embedding tables (the tokenizer) with the lowered one."""
    model, schema = _model(name)
    batch = random_batch(schema, 50, seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(batch).logits
    for dtype, atol, rtol in (("fp32", 1e-5, 1e-5), ("bf16", 0.1, 0.05)):
        fast = optimize_for_inference(model, dtype=dtype, micro_batch=micro_batch)
        got = fast(batch)
        assert got.logits.dtype == torch.float32 and got.logits.shape == ref.shape
        assert not got.logits.requires_grad  # no autograd, even with grad mode on
        torch.testing.assert_close(got.logits, ref, atol=atol, rtol=rtol)
        if isinstance(fast, InferenceRanker):
            assert fast.tokenizer is model.tokenizer
            want = torch.bfloat16 if dtype == "bf16" else torch.float32
            assert all(t.dtype == want for t in fast.heads.parameters())
            lowered_types = {type(b) for b in getattr(fast.blocks, "blocks", [])}
            if name in TOKEN_MAJOR:
                assert isinstance(fast.blocks, TokenMajorStack)
                assert lowered_types <= {TokenMajorRankMixer, TokenMajorTokenMixerLarge}
            else:  # MoE stages and UniMixer keep the blocks' own forward (a frozen copy)
                assert not isinstance(fast.blocks, TokenMajorStack)
                assert fast.blocks is not model.blocks
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert model.training is False


def test_bf16_mixer_equals_the_bf16_copy_of_its_blocks():
    """Where no fast block exists (UniMixer, MoE stages) the bf16 lowering is exactly the model
    with its stack and heads converted to bf16 (tokens cast once after the tokenizer), buffers
    (the Sinkhorn temperature) kept in fp32."""
    import copy

    for name in ("unimixer", "rankmixer_moe"):
        model, schema = _model(name)
        batch = random_batch(schema, 40)
        ref = copy.deepcopy(model)
        for part in (ref.blocks, ref.heads):
            for m in part.modules():
                for key, p in m._parameters.items():
                    if p is not None:
                        m._parameters[key] = torch.nn.Parameter(p.detach().bfloat16())
        fast = optimize_for_inference(model, dtype="bf16")
        with torch.no_grad():
            tokens = model.tokenizer(batch.dense, batch.sparse)
            want = ref.dense_part(tokens.bfloat16())[0].float()
            got = fast(batch).logits
        assert torch.equal(got, want), name
        assert all(b.dtype == torch.float32 for b in fast.blocks.buffers())


def test_lowering_is_a_snapshot_and_training_never_sees_it():
    """The lowered model holds copies of the dense weights: a training step on the eager model
    changes its output, not the lowered one's; lowering again follows. The trained model keeps
    the blocks of ranking.model (no lowered module ever enters it)."""
    model, schema = _model("rankmixer")
    batch = random_batch(schema, 32)
    fast = optimize_for_inference(model, dtype="fp32")
    before = fast(batch).logits
    model.train()
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if "tokenizer" not in n], lr=0.5)
    F.binary_cross_entropy_with_logits(model(batch).logits, batch.labels).backward()
    opt.step()
    model.eval()
    assert torch.equal(fast(batch).logits, before)
    with torch.no_grad():
        torch.testing.assert_close(
            optimize_for_inference(model, dtype="fp32")(batch).logits,
            model(batch).logits,
            atol=1e-5,
            rtol=1e-5,
        )
    assert not any(type(m).__module__ == "ranking.lowered" for m in model.modules())


def test_bad_arguments_are_named():
    model, _ = _model("rankmixer")
    with pytest.raises(ValueError, match="dtype: expected one of"):
        optimize_for_inference(model, dtype="int4")
    with pytest.raises(ValueError, match="move the model first"):
        optimize_for_inference(model, dtype="fp32", device="meta")


# ----------------------------------------------------------------------------- fast blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
@pytest.mark.parametrize(
    ("T", "D", "H"), [(4, 16, 4), (8, 64, 8), (3, 12, 2), (5, 10, 5), (2, 6, 3)]
)
def test_token_major_mix_and_revert_move_whole_chunks(dtype, T, D, H):
    """``mix_tm`` / ``revert_tm`` (token-major, copies moved as wide elements where the chunk
    size allows) against an element loop of the definition, also on a tensor that starts at an
    odd offset in its storage and with autograd on (the plain copy)."""
    B, d = 3, D // H
    base = (torch.arange(T * B * D + 1) % 127).to(dtype)
    for x in (base[:-1].view(T, B, D), base[1:].view(T, B, D)):  # aligned / offset by one
        want = torch.empty(H, B, T * d, dtype=dtype)
        for t in range(T):
            for b in range(B):
                for h in range(H):
                    want[h, b, t * d : (t + 1) * d] = x[t, b, h * d : (h + 1) * d]
        got = mix_tm(x, H)
        assert torch.equal(got, want) and got.is_contiguous()
        assert got.data_ptr() != x.data_ptr()
        assert torch.equal(revert_tm(got, T), x)
    if dtype.is_floating_point:
        x = torch.randn(T, B, D, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda v: revert_tm(mix_tm(v, H) * 2, T), (x,))


@pytest.mark.parametrize(
    "model",
    [
        {"arch": "rankmixer", "dim": 24, "num_tokens": 4, "num_layers": 2},
        {"arch": "tokenmixer_large", "dim": 24, "num_heads": 6, "num_layers": 3},
        {"arch": "tokenmixer_large", "dim": 16, "num_heads": 2, "num_layers": 5},
    ],
)
def test_token_major_stack_keeps_the_interlayer_residual(model):
    """The lowered stack (transposed once, blocks token-major, TokenMixer-Large's residual every
    n layers) against the stack's own forward; the input is never written into."""
    from ranking.inference import lower_stack

    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({**model, "down_init_scale": 1.0})
    cfg.resolve(4)
    stack = build_stack(cfg, 4).eval()
    x = torch.randn(5, 4, cfg.dim)
    x_before = x.clone()
    low = lower_stack(stack, torch.float32, CPU)
    assert isinstance(low, TokenMajorStack)
    with torch.no_grad():
        got, want = low(x).x, stack(x).x
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(x, x_before)


@pytest.mark.parametrize(
    "model",
    [
        {"arch": "rankmixer", "dim": 32, "num_tokens": 4},
        {"arch": "rankmixer", "dim": 32, "num_tokens": 4, "norm": "rms"},
        {"arch": "tokenmixer_large", "dim": 32, "num_heads": 4, "num_layers": 2},
    ],
)
def test_compiled_epilogues_keep_the_result(model):
    """``compile_epilogues``: the norms and SwiGLU activations between the GEMMs go through
    torch.compile (fp32: equal to float rounding; bf16: within a couple of bf16 steps); a bad
    input fails in the eager call too, so the compiled path is kept."""
    from ranking.inference import lower_stack

    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({**model, "down_init_scale": 1.0})
    cfg.resolve(4)
    stack = build_stack(cfg, 4).eval()
    x = torch.randn(7, 4, cfg.dim)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        with torch.no_grad():
            ref = lower_stack(stack, dtype, CPU)(x.to(dtype)).x
            got = lower_stack(stack, dtype, CPU, compile_epilogues=True)(x.to(dtype)).x
        torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)
    want = {"norm", "swiglu"} if model["arch"] == "tokenmixer_large" else {"norm"}
    assert want <= set(EPILOGUES)  # the compiled path really ran
    assert not any(EPILOGUES[k].fell_back for k in want)
    norm = EPILOGUES["norm"]
    with pytest.raises(RuntimeError):  # a bad input fails eagerly too: no fallback
        norm(x, torch.ones(cfg.dim + 1), None, 1e-6, True)
    assert not norm.fell_back


NO_COMPILER_SCRIPT = """
import logging, torch
from ranking.inference import optimize_for_inference
from ranking.model.config import ModelConfig
from ranking.model.ranker import build_model
from ranking.model.synthetic import random_batch, toy_schema
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
schema = toy_schema()
cfg = {"arch": "tokenmixer_large", "dim": 16, "num_tokens": 4, "num_heads": 4}
m = build_model(ModelConfig.from_dict(cfg), schema).eval()
b = random_batch(schema, 8)
ref = optimize_for_inference(m, dtype="fp32")(b).logits
epi = optimize_for_inference(m, dtype="fp32", compile_epilogues=True)
first, second = epi(b).logits, epi(b).logits
whole = optimize_for_inference(m, dtype="fp32", compile=True)(b).logits
print("EQUAL", torch.equal(first, ref), torch.equal(second, ref), torch.equal(whole, ref))
"""


def test_compile_without_a_cxx_compiler_runs_eagerly(tmp_path):
    """``compile_epilogues`` / ``compile`` where Inductor finds no C++ compiler (the serving
    image has none): the forward runs eagerly with the same result and one warning per
    compiled function, instead of failing every request."""
    env = {
        **os.environ,
        "CXX": str(tmp_path / "no-such-c++"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"),  # no compiled kernels to reuse
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
    }
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, "-c", NO_COMPILER_SCRIPT],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "EQUAL True True True" in r.stdout
    warnings = [ln for ln in r.stderr.splitlines() if "torch.compile failed" in ln]
    assert len(warnings) == 3, r.stderr[-3000:]  # norm, swiglu, the whole stack: once each
    assert all("running it eagerly" in w and "C++ compiler" in w for w in warnings)


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("key", "value", "new"),
    [
        ("compile", True, "inference.compile"),
        ("compile_epilogues", True, "inference.compile_epilogues"),
        ("cpu_fused_block", True, "inference.cpu_fused_block"),
        ("micro_batch", 256, "inference.micro_batch"),
        ("compute_dtype", "bf16", "train.compute_dtype"),
    ],
)
def test_old_runtime_keys_name_their_new_place(tmp_path, key, value, new):
    from ranking.train.config import load_experiment

    cfg = tmp_path / "old.yaml"
    cfg.write_text(
        f"schema: frappe\nmodel: {{arch: rankmixer, num_tokens: 4, {key}: {json.dumps(value)}}}\n"
    )
    with pytest.raises(ConfigError, match=rf"old.yaml: model.{key}: moved to {new}"):
        load_experiment(cfg, require_data=False)
    section, name = new.split(".")
    cfg.write_text(
        f"schema: frappe\nmodel: {{arch: rankmixer, num_tokens: 4}}\n"
        f"{section}: {{{name}: {json.dumps(value)}}}\n"
    )
    exp = load_experiment(cfg, require_data=False)
    assert getattr(getattr(exp, section), name) == value


@pytest.mark.parametrize(
    ("key", "value", "section"),
    [
        ("second_residual", "reverted", "tokenmixer_large"),
        ("aux_loss_weight", 0.1, "tokenmixer_large"),
        ("block_size", 8, "unimixer"),
        ("tau_end", 0.1, "unimixer"),
        ("dense_arch", [8], "dlrm"),
        ("dcn_rank", 4, "dlrm"),
    ],
)
def test_flat_family_keys_name_their_section(key, value, section):
    with pytest.raises(
        ConfigError, match=rf"cfg.yaml: model.{key}: moved to model.{section}.{key}"
    ):
        ModelConfig.from_dict({"arch": "rankmixer", key: value}, source="cfg.yaml")
    cfg = ModelConfig.from_dict(
        {"arch": "rankmixer", "num_tokens": 4, section: {key: value}}, source="cfg.yaml"
    )
    assert getattr(getattr(cfg, section), key) == value
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg  # round trip through the manifest form


def test_inference_section_is_checked(tmp_path):
    from ranking.train.config import load_experiment

    base = "schema: frappe\nmodel: {arch: rankmixer, num_tokens: 4}\n"
    for body, match in (
        ("inference: {fuse: true}", "inference.fuse: unknown key"),
        ("inference: {micro_batch: -1}", "inference.micro_batch: must be >= 0"),
        ("inference: {compile: 1}", "inference.compile: expected bool"),
        ("train: {compute_dtype: fp16}", "train.compute_dtype: expected one of"),
    ):
        (tmp_path / "c.yaml").write_text(base + body + "\n")
        with pytest.raises(ConfigError, match=match):
            load_experiment(tmp_path / "c.yaml", require_data=False)
    assert InferenceConfig.from_dict(None) == InferenceConfig()


def test_every_preset_loads_with_its_inference_section():
    """configs/models/*.yaml: architecture in model:, runtime choices in inference:."""
    from ranking.train.config import load_experiment

    presets = sorted((Path(__file__).resolve().parents[1] / "configs" / "models").glob("*.yaml"))
    assert presets
    fused = []
    for p in presets:
        exp = load_experiment(p, require_data=False)
        if exp.inference.cpu_fused_block:
            fused.append(p.stem)
    assert {"rankmixer_medium", "tokenmixer_large_medium"} <= set(fused)


def test_artifact_from_before_the_split_still_loads(tmp_path):
    """A manifest in the old format (runtime keys and every family's keys flat inside
    config.model, as exported before the split, written here by hand) loads: the runtime keys
    move to config.inference / config.train, the family keys into their sections, the model
    version is kept, and the artifact serves the same probabilities as the same weights
    exported in the new format."""
    from ranking.export import load_artifact, write_artifact

    model, schema = _model("tokenmixer_large", num_tasks=1)
    model_cfg = ModelConfig.from_dict(SMALL["tokenmixer_large"]).to_dict()
    new_cfg = {
        "name": "t",
        "schema": "toy",
        "model": model_cfg,
        "inference": {"micro_batch": 16, "compile_epilogues": False},
    }
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    kw = dict(schema=schema, dtype="fp32", metrics={}, step=1)
    new = write_artifact(tmp_path / "new", weights, config=new_cfg, **kw)
    old = write_artifact(tmp_path / "old", weights, config=new_cfg, **kw)
    mf = old / "manifest.json"
    manifest = json.loads(mf.read_text())
    flat = {k: v for k, v in model_cfg.items() if k not in ("tokenmixer_large", "unimixer", "dlrm")}
    for section in ("tokenmixer_large", "unimixer", "dlrm"):  # the old format: every key flat
        flat.update(model_cfg[section])
    manifest["config"] = {
        "name": "t",
        "schema": "toy",
        "model": {**flat, "micro_batch": 16, "compute_dtype": "bf16", "compile": False},
    }
    mf.write_text(json.dumps(manifest))
    art = load_artifact(old)
    assert art.model_version == manifest["model_version"]
    assert art.inference == InferenceConfig(micro_batch=16)
    assert art.manifest["config"]["train"] == {"compute_dtype": "bf16"}
    migrated = art.manifest["config"]["model"]
    assert "micro_batch" not in migrated and "aux_loss_weight" not in migrated
    assert migrated["tokenmixer_large"] == model_cfg["tokenmixer_large"]
    assert migrated["unimixer"] == model_cfg["unimixer"] and migrated["dlrm"] == model_cfg["dlrm"]
    batch = random_batch(schema, 40)
    torch.testing.assert_close(art.predict(batch), load_artifact(new).predict(batch))
    with torch.no_grad():
        want = torch.sigmoid(model(batch).logits)
    torch.testing.assert_close(art.predict(batch), want, atol=1e-5, rtol=1e-5)


def test_export_checks_the_lowered_model_against_the_trained_one(monkeypatch):
    """``export.check_lowering`` (run by every export): the lowered model passes within the
    dtype's tolerance, and a lowering that computes something else is refused, naming the
    checkpoint and the difference."""
    from ranking.export import ArtifactError, check_lowering

    model, schema = _model("rankmixer")
    config = {"inference": {"micro_batch": 16}}
    assert check_lowering(model, schema, "fp32", config, "ckpt") < 1e-5
    assert check_lowering(model, schema, "bf16", config, "ckpt") < 0.1

    real = TokenMajorRankMixer.forward
    monkeypatch.setattr(TokenMajorRankMixer, "forward", lambda self, x: real(self, x) * 1.5)
    with pytest.raises(ArtifactError, match=r"ckpt: the model lowered for inference \(fp32"):
        check_lowering(model, schema, "fp32", config, "ckpt")
