"""The deployments' ``user_config`` has one definition (``serving.settings``): the shipped
``deploy/serve.yaml`` documents exactly its defaults, the Helm chart's value schema gives the
overridable keys the fields' types, and every bad value is refused naming the key."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from serving.settings import IngressSettings, RankerSettings

REPO = Path(__file__).resolve().parents[1]


def _serve_yaml_deployments() -> dict:
    cfg = yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text())
    return {d["name"]: d for a in cfg["applications"] for d in a["deployments"]}


def test_serve_yaml_sets_the_defaults():
    """Every key the file sets (but the artifact path) is the code's default: the app, the
    file and the chart (which renders the file) cannot disagree."""
    uc = _serve_yaml_deployments()["Ranker"]["user_config"]
    s = RankerSettings.from_user_config(uc)
    defaults = RankerSettings()
    for f in dataclasses.fields(RankerSettings):
        if f.name != "artifact":
            assert getattr(s, f.name) == getattr(defaults, f.name), f.name
    assert set(uc) == {f.name for f in dataclasses.fields(RankerSettings)}  # all documented


def test_helm_value_schema_types_are_the_fields_types():
    schema = json.loads((REPO / "helm" / "mixrank" / "values.schema.json").read_text())
    ranker = schema["properties"]["serving"]["properties"]["ranker"]["properties"]
    json_type = {int: "integer", float: "number"}
    for value_key, field in [
        ("maxBatchSize", "max_batch_size"),
        ("batchWaitTimeoutS", "batch_wait_timeout_s"),
        ("torchThreads", "torch_threads"),
    ]:
        assert json_type[RankerSettings._KINDS[field]] in ranker[value_key]["type"], value_key
    assert set(ranker["forwardInThread"]["enum"]) - {None} == {True, False, "auto"}
    pattern = re.compile(ranker["device"]["pattern"])
    for device in ("auto", "cpu", "cuda", "cuda:1", "gpu", "cuda:x"):
        ok = device in ("auto", "cpu", "cuda") or device.startswith("cuda:")
        ok = ok and (device == "cuda" or ":" not in device or device[5:].isdigit())
        assert bool(pattern.match(device)) == ok, device
    assert ranker["maxBatchSize"]["minimum"] == 1 and ranker["torchThreads"]["minimum"] == 0


@pytest.mark.parametrize(
    "config, message",
    [
        ({"max_batch_wait": 0.05}, r"unknown keys \['max_batch_wait'\]"),
        ({}, r"'artifact' \(the artifact directory\) is required"),
        ({"max_batch_size": "4096"}, r"user_config\.max_batch_size: expected an integer"),
        ({"max_batch_size": True}, r"user_config\.max_batch_size: expected an integer"),
        ({"max_batch_size": 0}, r"user_config\.max_batch_size: must be positive"),
        ({"batch_wait_timeout_s": "fast"}, r"user_config\.batch_wait_timeout_s: expected a number"),
        ({"batch_wait_timeout_s": float("nan")}, r"batch_wait_timeout_s: expected a finite"),
        ({"max_batch_wait_s": -1}, r"user_config\.max_batch_wait_s: must be >= 0"),
        ({"torch_threads": -2}, r"user_config\.torch_threads: must be >= 0"),
        ({"dtype": "fp16"}, r"user_config\.dtype: expected one of"),
        ({"device": "gpu"}, r"user_config\.device: expected auto, cpu, cuda or cuda:N"),
        ({"forward_in_thread": "yes"}, r"forward_in_thread must be true, false or auto"),
        ({"forward_in_thread": 1}, r"forward_in_thread must be true, false or auto"),
        ({"max_candidates": 5000}, r"max_candidates \(5000\) must be <= max_batch_size \(4096\)"),
        ({"artifact": 3}, r"user_config\.artifact: expected a string"),
    ],
)
def test_bad_ranker_settings_name_the_key(config, message):
    config = {"artifact": "/models/x", **config} if "artifact" not in config and config else config
    with pytest.raises(ValueError, match=message):
        RankerSettings.from_user_config(config)


def test_settings_read_values_and_limits():
    s = RankerSettings.from_user_config(
        {"artifact": "/m", "max_batch_size": 512, "max_candidates": 256, "batch_wait_timeout_s": 0}
    )
    assert (s.max_batch_size, s.batch_wait_timeout_s, s.max_candidates) == (512, 0.0, 256)
    assert s.limits().max_candidates == 256 and s.ingress.max_body_bytes == 8 << 20
    with pytest.raises(ValueError, match=r"user_config\.max_body_bytes: must be positive"):
        IngressSettings.from_user_config({"max_body_bytes": 0})
    with pytest.raises(ValueError, match=r"unknown keys \['artifact'\]"):
        IngressSettings.from_user_config({"artifact": "/m"})


def test_serve_config_refuses_a_bad_value_naming_file_and_key(tmp_path):
    from ranking.errors import UserError
    from serving import config

    bad = yaml.safe_load(config.DEFAULT_CONFIG.read_text())
    dep = next(d for d in bad["applications"][0]["deployments"] if d["name"] == "Ranker")
    dep["user_config"]["max_batch_size"] = -1
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(UserError, match=r"serve\.yaml: .*\(Ranker\): user_config\.max_batch_size"):
        config.load_config(path)


def test_device_resolution_names_the_key():
    """``auto`` follows what torch sees (a replica without num_gpus sees no GPU); asking for a
    GPU that is not there is a clear error naming the key, not a CPU fallback."""
    import torch

    from ranking.export import resolve_device

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=rf"user_config\.device: 'cuda:{n}', but torch sees {n}"):
        resolve_device(f"cuda:{n}", "user_config.device")
    with pytest.raises(ValueError, match=r"device: expected auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
