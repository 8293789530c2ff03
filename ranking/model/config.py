"""Model configuration: one dataclass, loaded from the ``model:`` section of an experiment YAML.

An experiment YAML looks like::

    name: rankmixer-small
    schema: frappe                 # a preset in configs/schemas/ or a path to a schema YAML
    model:
      arch: rankmixer
      dim: 64
      num_tokens: 8
      num_layers: 2
      moe: {enabled: true, num_experts: 4}
    train: {...}                   # other sections belong to other owners and are ignored here

Unknown keys inside ``model:`` (and ``model.moe:``) are errors that name the key and the file.
Shape checks that need the schema (the token count T of the ``groups`` tokenizer) happen in
``ModelConfig.resolve(schema)``, called by ``build_model``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ARCHS = ("rankmixer", "tokenmixer_large", "unimixer", "unimixer_lite", "dlrm", "dcnv2")
MIXER_ARCHS = ("rankmixer", "tokenmixer_large", "unimixer", "unimixer_lite")


class ConfigError(ValueError):
    """A model config is invalid. The message names the file and the key."""


# Runtime keys that ``model:`` held before the architecture / runtime split: where each lives now.
MOVED = {
    "compute_dtype": "train.compute_dtype",
    "micro_batch": "inference.micro_batch",
    "compile": "inference.compile",
    "compile_epilogues": "inference.compile_epilogues",
    "cpu_fused_block": "inference.cpu_fused_block",
}


@dataclass
class MoEConfig:
    """Sparse per-token MoE options (``model.moe``).

    kind: ``rankmixer`` (ReLU gate, L1 penalty, DTSI routers) or ``tokenmixer_large`` (top-k
        softmax over E sub-experts plus an always-on shared expert); default: the arch's own.
    num_experts: E experts per token.
    top_k: routed experts per token (``tokenmixer_large`` only). The paper's notes write
        ``sum over the top (k-1)`` plus the shared expert, i.e. k active experts in all: their k
        is ``top_k + 1`` here when ``shared_expert`` is on.
    renormalize: top-k gate weights are a softmax over the k chosen logits (default, True) or
        the full softmax's top-k probabilities (False); the notes do not settle which.
    expert_mult: expert hidden width as a multiple of D; default ``ffn_mult`` for ``rankmixer``
        (each expert is a full PFFN) and ``ffn_mult / E`` for ``tokenmixer_large`` (the pSwiGLU
        split into E sub-experts).
    shared_expert: always-on shared expert (``tokenmixer_large``; hidden ``expert_mult * D``).
    alpha: routed-output scale; default ``E / top_k`` (1 / sparsity).
    l1_weight: weight of the L1 gate penalty (``rankmixer``).
    dtsi: separate training and inference routers (``rankmixer``).
    dtsi_train_mode: how the routers are combined in training: ``average`` (default: gate =
        (ReLU(h_train) + ReLU(h_infer)) / 2, so h_infer gets task-loss gradient), ``sum``, or
        ``train_router`` (h_train alone; h_infer then learns only from the L1 term, as in ports).
    """

    enabled: bool = False
    kind: str = ""
    num_experts: int = 4
    top_k: int = 2
    renormalize: bool = True
    expert_mult: float = 0.0
    shared_expert: bool = True
    alpha: float = 0.0
    l1_weight: float = 1e-4
    dtsi: bool = True
    dtsi_train_mode: str = "average"


@dataclass
class TokenMixerLargeConfig:
    """TokenMixer-Large's own keys (``model.tokenmixer_large``).

    second_residual: ``input`` (X_next = X + F2(...), default) or ``reverted``
        (Revert(H') + F2(...)).
    interlayer_residual_every: an extra residual every n layers (0 = off).
    aux_loss_weight: weight of the heads' BCE on each lower layer's output (training only).
    """

    second_residual: str = "input"
    interlayer_residual_every: int = 2
    aux_loss_weight: float = 0.0


@dataclass
class UniMixerConfig:
    """UniMixer's and UniMixer-Lite's own keys (``model.unimixer``).

    block_size: B, the local block width (0 = D); sinkhorn_iters; flatten (``channel_major`` as
    in the authors' code, or ``token_major``); tau_start, tau_end: the Sinkhorn temperature's
    linear anneal over training; lite_bases (b) and lite_rank (r): UniMixer-Lite only.
    """

    block_size: int = 0
    sinkhorn_iters: int = 10
    flatten: str = "channel_major"
    tau_start: float = 1.0
    tau_end: float = 0.05
    lite_bases: int = 4
    lite_rank: int = 8


@dataclass
class DLRMConfig:
    """The DLRM / DCNv2 baselines' own keys (``model.dlrm``): ``dense_arch`` (bottom MLP; the
    embedding dim is appended), ``over_arch`` (n_tasks appended), ``dcn_layers`` and
    ``dcn_rank`` (DCNv2 only)."""

    dense_arch: list[int] = field(default_factory=lambda: [64])
    over_arch: list[int] = field(default_factory=lambda: [128, 64])
    dcn_layers: int = 3
    dcn_rank: int = 32


HEAD_TYPES = ("separate", "mmoe", "ple")


@dataclass
class HeadsConfig:
    """The task heads (``model.heads``; mixer archs): how the pooled representation is shared by
    the schema's tasks (``ranking/model/heads.py``, docs/MODELS.md).

    type: ``separate`` (one MLP per task on the pooled input), ``mmoe`` (``experts`` shared
        experts, a softmax gate per task) or ``ple`` (per level, ``task_experts`` experts of each
        task and ``shared_experts`` shared ones; ``levels`` extraction levels, 1 = CGC).
    expert_hidden: each expert's MLP widths (ReLU after each); the last is its output width,
        which the task towers (``head_hidden``) take.
    """

    type: str = "separate"
    experts: int = 4
    task_experts: int = 1
    shared_experts: int = 1
    levels: int = 1
    expert_hidden: list[int] = field(default_factory=lambda: [64])


SEQUENCE_ENCODERS = ("pool", "target_attention", "query_tokens")


@dataclass
class SequenceConfig:
    """How each behaviour sequence of the schema becomes tokens (``model.sequence``;
    ``ranking/model/sequence.py``, docs/MODELS.md).

    encoder: ``pool`` (the mean or sum of the sequence's embeddings, one token; the baseline),
        ``target_attention`` (the target's embedding attends over the sequence, DIN-style, one
        token per candidate) or ``query_tokens`` (``query_tokens`` learned queries attend over
        it, k tokens per request). DLRM and DCNv2 take ``pool`` only (a pooled embedding).
    encoders: per-feature choice ``{feature name: encoder}``, over ``encoder``.
    heads: attention heads; ``attn_dim``: the attention width (0: the model's D).
    """

    encoder: str = "pool"
    encoders: dict = field(default_factory=dict)
    heads: int = 2
    attn_dim: int = 0
    query_tokens: int = 4

    def encoder_of(self, name: str) -> str:
        return self.encoders.get(name, self.encoder)


ALL_ARCHS = ("rankmixer", "tokenmixer_large", "unimixer", "unimixer_lite", "dlrm", "dcnv2")

# section name -> (its dataclass, the archs it applies to)
SECTIONS = {
    "moe": (MoEConfig, ("rankmixer", "tokenmixer_large")),
    "tokenmixer_large": (TokenMixerLargeConfig, ("tokenmixer_large",)),
    "unimixer": (UniMixerConfig, ("unimixer", "unimixer_lite")),
    "dlrm": (DLRMConfig, ("dlrm", "dcnv2")),
    "heads": (HeadsConfig, ("rankmixer", "tokenmixer_large", "unimixer", "unimixer_lite")),
    "sequence": (SequenceConfig, ALL_ARCHS),
}


@dataclass
class ModelConfig:
    """Everything that defines a model's architecture (``model:`` in an experiment YAML).

    Common: ``arch``, ``dim`` (D), ``num_layers`` (L), ``ffn_mult`` (k for PFFN, n for pSwiGLU),
    ``pooling`` (``mean`` | ``first`` | ``flatten``), ``head_hidden`` (task head MLP widths),
    ``head_dropout`` (dropout probability on the pooled input of each task head and after each of
    its hidden ReLUs), ``token_dropout`` (dropout probability on the tokenizer's output tokens,
    before the mixer stack); both are training-only (identity in eval) and mixer-only,
    ``embedding_init_scale`` (every table starts ``U(-s, s)``; 0 = TorchRec's default
    ``U(-sqrt(1/rows), sqrt(1/rows))``, which starts a 3-row table at up to 0.58),
    Architecture only: how a model is executed is not here. Mixed precision in training is
    ``train.compute_dtype``; micro-batches, compilation and the fused CPU ops at inference are
    the ``inference:`` section (``ranking.inference.InferenceConfig``). The old keys name their
    new place when met (``MOVED``).

    Tokenizer: ``tokenizer`` (``groups`` | ``slices``), ``num_tokens`` (total T incl. dense and
    global tokens; required for ``slices``, checked for ``groups``), ``token_proj`` (``linear`` |
    ``mlp``), ``dense_token`` (a token from ``Batch.dense`` when Nd > 0), ``global_token``.

    Mixing: ``num_heads`` (H; RankMixer uses H = T), ``norm`` (``rms`` | ``layer``);
    ``down_init_scale`` (initial scale of every pSwiGLU's down projection: TokenMixer-Large,
    UniMixer).

    Per-architecture sections hold the keys of one family (``SECTIONS``): ``moe``
    (``MoEConfig``), ``tokenmixer_large`` (``TokenMixerLargeConfig``), ``unimixer``
    (``UniMixerConfig``, also UniMixer-Lite), ``dlrm`` (``DLRMConfig``, also DCNv2). A flat key
    that moved into a section (``model.block_size``) is an error naming its new place.
    """

    arch: str = "rankmixer"
    dim: int = 64
    num_layers: int = 2
    ffn_mult: float = 4.0
    pooling: str = "mean"
    head_hidden: list[int] = field(default_factory=list)
    head_dropout: float = 0.0
    token_dropout: float = 0.0
    embedding_init_scale: float = 0.0
    # tokenizer
    tokenizer: str = ""
    num_tokens: int = 0
    token_proj: str = "linear"
    dense_token: bool = True
    global_token: bool = False
    # mixing
    num_heads: int = 0
    norm: str = ""
    down_init_scale: float = 0.01
    moe: MoEConfig = field(default_factory=MoEConfig)
    tokenmixer_large: TokenMixerLargeConfig = field(default_factory=TokenMixerLargeConfig)
    unimixer: UniMixerConfig = field(default_factory=UniMixerConfig)
    dlrm: DLRMConfig = field(default_factory=DLRMConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    sequence: SequenceConfig = field(default_factory=SequenceConfig)
    source: str = field(default="<dict>", compare=False, repr=False)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> ModelConfig:
        """Build from the ``model:`` mapping; unknown keys raise ``ConfigError``."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: model: expected a mapping, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
        kw: dict[str, Any] = {}
        for key, value in data.items():
            if key in IN_SECTION:
                raise ConfigError(
                    f"{source}: model.{key}: moved to model.{IN_SECTION[key]}.{key} (keys of "
                    f"one architecture family live in its section)"
                )
            if key in MOVED:
                raise ConfigError(
                    f"{source}: model.{key}: moved to {MOVED[key]} (the model section holds "
                    f"the architecture only; runtime choices belong to the trainer and "
                    f"inference sections)"
                )
            if key not in fields:
                raise ConfigError(
                    f"{source}: model.{key}: unknown key (expected one of {sorted(fields)})"
                )
            if key in SECTIONS:
                kw[key] = section_from_dict(SECTIONS[key][0], value, f"model.{key}", source)
            else:
                kw[key] = _coerce(f"model.{key}", value, fields[key], source)
        cfg = cls(**kw, source=source)
        cfg._fill_defaults()
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> tuple[ModelConfig, str]:
        """Read an experiment YAML: returns ``(model config, schema reference)``."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config file: {e.strerror or e}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        if "model" not in data:
            raise ConfigError(f"{path}: model: required section is missing")
        schema = data.get("schema")
        if not isinstance(schema, str) or not schema:
            raise ConfigError(f"{path}: schema: required, a preset name or a schema path")
        return cls.from_dict(data["model"], source=str(path)), schema

    def to_dict(self) -> dict[str, Any]:
        """The ``model:`` mapping (round-trips through ``from_dict``); for manifests."""
        d = dataclasses.asdict(self)
        d.pop("source")
        return d

    # ------------------------------------------------------------------ checks
    def _err(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}: model.{key}: {msg}")

    def _fill_defaults(self) -> None:
        if not self.tokenizer:
            self.tokenizer = "slices" if self.arch == "rankmixer" else "groups"
        if not self.norm:
            self.norm = "layer" if self.arch == "rankmixer" else "rms"
        m = self.moe
        if not m.kind:
            m.kind = "tokenmixer_large" if self.arch == "tokenmixer_large" else "rankmixer"
        if not m.expert_mult:
            m.expert_mult = (
                self.ffn_mult if m.kind == "rankmixer" else self.ffn_mult / m.num_experts
            )
        if not m.alpha:
            m.alpha = m.num_experts / m.top_k if m.kind == "tokenmixer_large" else 1.0

    def validate(self) -> None:
        """Checks that need no schema; ``resolve`` does the rest."""

        def choice(key: str, value: Any, options: tuple) -> None:
            if value not in options:
                raise self._err(key, f"expected one of {list(options)}, got {value!r}")

        choice("arch", self.arch, ARCHS)
        choice("tokenizer", self.tokenizer, ("groups", "slices"))
        choice("token_proj", self.token_proj, ("linear", "mlp"))
        choice("pooling", self.pooling, ("mean", "first", "flatten"))
        choice("norm", self.norm, ("rms", "layer"))
        choice(
            "tokenmixer_large.second_residual",
            self.tokenmixer_large.second_residual,
            ("input", "reverted"),
        )
        choice("unimixer.flatten", self.unimixer.flatten, ("channel_major", "token_major"))
        choice("moe.kind", self.moe.kind, ("rankmixer", "tokenmixer_large"))
        choice("moe.dtsi_train_mode", self.moe.dtsi_train_mode, ("average", "sum", "train_router"))
        u = self.unimixer
        positive = {"dim": self.dim, "num_layers": self.num_layers}
        positive.update(
            {f"unimixer.{k}": getattr(u, k) for k in ("sinkhorn_iters", "lite_bases", "lite_rank")}
        )
        for key, value in positive.items():
            if value < 1:
                raise self._err(key, f"must be a positive integer, got {value}")
        for key, value in (
            ("num_tokens", self.num_tokens),
            ("num_heads", self.num_heads),
            ("unimixer.block_size", u.block_size),
            (
                "tokenmixer_large.interlayer_residual_every",
                self.tokenmixer_large.interlayer_residual_every,
            ),
        ):
            if value < 0:
                raise self._err(key, f"must be >= 0, got {value}")
        if self.ffn_mult <= 0 or int(self.ffn_mult * self.dim) != self.ffn_mult * self.dim:
            raise self._err(
                "ffn_mult", f"ffn_mult * dim must be a positive integer, got {self.ffn_mult}"
            )
        if not 0.0 <= self.embedding_init_scale <= 1.0:
            raise self._err(
                "embedding_init_scale",
                f"must be in [0, 1] (0: TorchRec's default), got {self.embedding_init_scale}",
            )
        for key in ("head_dropout", "token_dropout"):
            p = getattr(self, key)
            if not 0.0 <= p < 1.0:
                raise self._err(key, f"a dropout probability must be in [0, 1), got {p}")
            if p and self.arch in ("dlrm", "dcnv2"):
                raise self._err(key, f"not available for arch {self.arch!r} (mixer archs only)")
        if not 0 < u.tau_end <= u.tau_start:
            raise self._err("unimixer.tau_end", "need 0 < tau_end <= tau_start")
        m = self.moe
        if m.num_experts < 1:
            raise self._err("moe.num_experts", f"must be >= 1, got {m.num_experts}")
        if not 1 <= m.top_k <= m.num_experts:
            raise self._err(
                "moe.top_k", f"must be in [1, num_experts={m.num_experts}], got {m.top_k}"
            )
        hid = m.expert_mult * self.dim
        if m.enabled and (hid < 1 or int(hid) != hid):
            raise self._err(
                "moe.expert_mult", f"expert_mult * dim must be a positive integer, got {hid}"
            )
        if m.enabled and self.arch in ("dlrm", "dcnv2"):
            raise self._err("moe.enabled", f"MoE is not available for arch {self.arch!r}")
        if self.tokenizer == "slices" and self.arch in MIXER_ARCHS and self.num_tokens < 1:
            raise self._err("num_tokens", "required (> 0) with tokenizer: slices")
        h = self.heads
        if h.type not in HEAD_TYPES:
            raise self._err("heads.type", f"expected one of {list(HEAD_TYPES)}, got {h.type!r}")
        for key in ("experts", "levels", "shared_experts"):
            if getattr(h, key) < 1:
                raise self._err(f"heads.{key}", f"must be >= 1, got {getattr(h, key)}")
        if h.task_experts < 0:
            raise self._err("heads.task_experts", f"must be >= 0, got {h.task_experts}")
        if not h.expert_hidden or min(h.expert_hidden) < 1:
            raise self._err("heads.expert_hidden", "a non-empty list of positive widths")
        if h.type != "separate" and self.arch in ("dlrm", "dcnv2"):
            raise self._err("heads.type", f"not available for arch {self.arch!r} (mixer archs)")
        q = self.sequence
        for name, enc in [("encoder", q.encoder)] + [
            (f"encoders.{k}", v) for k, v in q.encoders.items()
        ]:
            if enc not in SEQUENCE_ENCODERS:
                raise self._err(
                    f"sequence.{name}", f"expected one of {list(SEQUENCE_ENCODERS)}, got {enc!r}"
                )
            if enc != "pool" and self.arch in ("dlrm", "dcnv2"):
                raise self._err(
                    f"sequence.{name}",
                    f"{enc} is for the mixer archs; {self.arch} takes pooled sequences (pool)",
                )
        for key in ("heads", "query_tokens"):
            if getattr(q, key) < 1:
                raise self._err(f"sequence.{key}", f"must be >= 1, got {getattr(q, key)}")
        if q.attn_dim < 0 or (q.attn_dim or self.dim) % q.heads:
            raise self._err(
                "sequence.attn_dim",
                f"the attention width {q.attn_dim or self.dim} must split into heads={q.heads}",
            )
        d = self.dlrm
        if self.arch in ("dlrm", "dcnv2") and (not d.over_arch or not d.dense_arch):
            raise self._err("dlrm.over_arch", "dense_arch and over_arch must be non-empty")

    def resolve(self, num_tokens: int) -> None:
        """Shape checks once the tokenizer's T is known (named by key)."""
        T, D = num_tokens, self.dim
        if self.num_tokens and self.num_tokens != T:
            raise self._err(
                "num_tokens", f"is {self.num_tokens} but the {self.tokenizer} tokenizer gives T={T}"
            )
        if self.arch == "rankmixer":
            H = self.num_heads or T
            if H != T:
                raise self._err("num_heads", f"RankMixer mixes with H = T = {T}, got {H}")
            if D % T:
                raise self._err("dim", f"RankMixer token mixing needs T={T} to divide D={D}")
        if self.arch == "tokenmixer_large":
            H = self.num_heads or T
            if D % H:
                raise self._err("num_heads", f"H={H} must divide D={D} (mixed width T*D/H)")
            if (T * D) % H:
                raise self._err("num_heads", f"H={H} must divide T*D={T * D}")
        if self.arch in ("unimixer", "unimixer_lite"):
            Bk = self.unimixer.block_size or D
            if (T * D) % Bk:
                raise self._err("unimixer.block_size", f"B={Bk} must divide T*D={T * D}")


# flat keys of one family -> the model section they live in now
IN_SECTION = {
    f.name: name
    for name, (cls, _) in SECTIONS.items()
    if name not in ("moe", "heads", "sequence")  # never flat keys
    for f in dataclasses.fields(cls)
}


def migrate_experiment(raw: Any) -> Any:
    """An experiment config (a manifest's or checkpoint's ``config``) written before the
    architecture / runtime split, with its runtime keys moved out of ``model:`` to where
    ``MOVED`` says and its flat family keys into their sections (``IN_SECTION``); a config
    without them is returned unchanged. A key already set at its new place wins over the old
    one."""
    model = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(model, dict) or not set(model) & (set(MOVED) | set(IN_SECTION)):
        return raw
    kept = {k: v for k, v in model.items() if k not in MOVED and k not in IN_SECTION}
    for key, section in IN_SECTION.items():
        if key in model:
            sec = dict(kept.get(section) or {})
            sec.setdefault(key, model[key])
            kept[section] = sec
    out = {**raw, "model": kept}
    for key, new in MOVED.items():
        if key in model:
            section, name = new.split(".")
            moved = dict(out.get(section) or {})
            moved.setdefault(name, model[key])
            out[section] = moved
    return out


def section_from_dict(cls, data: Any, section: str, source: str):
    """A config dataclass from a YAML mapping: unknown keys and wrong types are errors naming
    ``<section>.<key>`` and the file. Shared by every config section (model, moe, data, train)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {section}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kw = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(
                f"{source}: {section}.{key}: unknown key (expected one of {sorted(fields)})"
            )
        kw[key] = _coerce(f"{section}.{key}", value, fields[key], source)
    return cls(**kw)


def _coerce(key: str, value: Any, f: dataclasses.Field, source: str) -> Any:
    """Type-check a YAML value against the dataclass field's default type."""
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    bad = ConfigError(f"{source}: {key}: expected {type(default).__name__}, got {value!r}")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad
    elif isinstance(default, int):
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad
    elif isinstance(default, float):
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise bad
        value = float(value)
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise bad
    elif isinstance(default, dict):
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{source}: {key}: expected a mapping of names, got {value!r}")
    elif isinstance(default, list) and (
        not isinstance(value, list) or not all(isinstance(v, int) and v > 0 for v in value)
    ):
        raise ConfigError(f"{source}: {key}: expected a list of positive integers, got {value!r}")
    return value


def temperature_at(step: int, total_steps: int, start: float = 1.0, end: float = 0.05) -> float:
    """UniMixer's linear temperature schedule: ``start`` at step 0 to ``end`` at ``total_steps``."""
    if total_steps <= 0:
        return end
    frac = min(max(step / total_steps, 0.0), 1.0)
    return start + (end - start) * frac


def load_experiment(path: str | Path):
    """``(ModelConfig, FeatureSchema)`` of an experiment YAML (schema resolved next to it or as a
    preset)."""
    from ranking.features import load_schema  # the one schema resolver

    cfg, schema_ref = ModelConfig.from_yaml(path)
    return cfg, load_schema(schema_ref, relative_to=path)
