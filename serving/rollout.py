"""``mixrank rollout`` and ``mixrank rollback``: a new model into a running service, safely.

Everything goes through Serve's public REST API on the Ray dashboard (``GET`` / ``PUT
/api/serve/applications/``, what ``serve deploy`` and KubeRay use): the deployed config is read,
the ``Ranker``'s ``user_config`` changed, the whole config put back. Only ``user_config``
changes, so Serve reconfigures the running replicas in place (``Ranker.reconfigure``: the old
model answers until the new one is loaded and validated; no replica restarts, no request is
lost). The same command works against a local ``mixrank serve`` (``--address
http://127.0.0.1:8265``) and a cluster's dashboard address.

Steps of a rollout of ``NEW`` (each prints one line):

1. check: ``NEW`` loads, passes the smoke forwards and is compatible with the serving model
   (``serving.model.load_validated``), before the service is touched;
2. gate (``--gate-data``): ``NEW`` and the serving model evaluated on the same rows; refused
   when ``NEW``'s AUC is lower by more than ``--max-auc-drop`` or its NE higher by more than
   ``--max-ne-increase``;
3. shadow (``--shadow-seconds``): ``user_config.shadow_artifact``; ``NEW`` scores a copy of live
   traffic in the replicas, nothing of it returned; the report reads the replicas' Prometheus
   counters (``--metrics-url``): correlation and mean shift of ``NEW``'s scores against the
   served ones, ``NEW``'s p99 scoring time;
4. canary (``--canary F``): ``user_config.canary_artifact`` / ``canary_fraction``; the requests
   whose ``canary_key`` hashes under ``F`` get ``NEW``'s answer, for ``--canary-seconds``;
   per-version request counts and p99 latency are reported;
5. promote: ``artifact = NEW`` (``previous_artifact`` records the old one, for ``mixrank
   rollback``); every replica must then report ``NEW`` on ``/healthz``, or the config is put
   back and the command fails.

The REST API needs Ray's token when the cluster has token authentication (Ray's default):
``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from ranking.errors import UserError

APP = "mixrank"
RANKER = "Ranker"
SIDE_KEYS = ("shadow_artifact", "canary_artifact")


class RolloutRefused(UserError):
    """The gate (or a check) refused the new model; the service is unchanged."""


# ----------------------------------------------------------------------------- Serve's REST API
def ray_token() -> str | None:
    """Ray's authentication token, where Ray itself looks for it."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


class ServeAdmin:
    """Serve's REST API on a Ray dashboard (``http://HOST:8265``)."""

    def __init__(self, address: str, token: str | None = None, timeout: float = 30.0):
        self.address = address.rstrip("/")
        self.token = token if token is not None else ray_token()
        self.timeout = timeout

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.address + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                text = r.read().decode() or "{}"
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            raise UserError(
                f"{self.address}{path}: Serve's REST API answered {e.code}: {detail}"
                + (" (set RAY_AUTH_TOKEN)" if e.code in (401, 403) else "")
            ) from None
        except (urllib.error.URLError, OSError) as e:
            raise UserError(
                f"{self.address}: cannot reach Serve's REST API (the Ray dashboard): {e}"
            ) from None
        return json.loads(text)

    def details(self) -> dict:
        return self._call("GET", "/api/serve/applications/")

    def config(self) -> dict:
        """The deployed Serve config, as ``PUT /api/serve/applications/`` takes it."""
        d = self.details()
        apps = [a["deployed_app_config"] for a in d.get("applications", {}).values()]
        if not any(a and a.get("name") == APP for a in apps):
            raise UserError(f"{self.address}: no application {APP!r} deployed by config")
        out = {"applications": apps}
        for key in ("proxy_location", "http_options", "grpc_options"):
            if d.get(key) is not None:
                out[key] = d[key]
        return out

    def deploy(self, config: dict) -> None:
        self._call("PUT", "/api/serve/applications/", config)

    def ranker_user_config(self, config: dict | None = None) -> dict:
        return _ranker(config or self.config()).get("user_config") or {}

    def replicas(self) -> int:
        app = self.details()["applications"][APP]
        dep = app["deployments"].get(RANKER) or {}
        return sum(1 for r in dep.get("replicas", []) if r.get("state") == "RUNNING")

    def update_ranker(self, changes: dict, timeout: float = 300.0) -> dict:
        """Put the deployed config back with the Ranker's ``user_config`` changed; wait until
        Serve reports the application RUNNING with that config. Returns the old user_config."""
        cfg = self.config()
        dep = _ranker(cfg)
        old = dict(dep.get("user_config") or {})
        new = {**old, **changes}
        dep["user_config"] = new
        self.deploy(cfg)
        self.wait_running(new, timeout)
        return old

    def wait_running(self, user_config: dict | None = None, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            d = self.details()
            app = d["applications"].get(APP) or {}
            dep = (app.get("deployments") or {}).get(RANKER) or {}
            applied = user_config is None or (
                _ranker({"applications": [app.get("deployed_app_config") or {}]}).get("user_config")
                == user_config
            )
            if applied and app.get("status") == "RUNNING" and dep.get("status") == "HEALTHY":
                return
            if app.get("status") == "DEPLOY_FAILED":
                raise UserError(f"Serve: application {APP!r} failed: {app.get('message')}")
            if time.monotonic() > deadline:
                raise UserError(
                    f"Serve: application {APP!r} not running after {timeout:.0f} s "
                    f"({app.get('status')}, Ranker {dep.get('status')})"
                )
            time.sleep(0.5)


def _ranker(config: dict) -> dict:
    for app in config.get("applications", []):
        if app.get("name") == APP:
            for dep in app.get("deployments", []):
                if dep.get("name") == RANKER:
                    return dep
            dep = {"name": RANKER}
            app.setdefault("deployments", []).append(dep)
            return dep
    raise UserError(f"Serve config: no application {APP!r}")


# ----------------------------------------------------------------------------- the service
def health(url: str, timeout: float = 10.0) -> dict:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/healthz", timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read() or b"{}")
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise UserError(f"{url}/healthz: {e}") from None


def wait_version(
    url: str, version: str | None, replicas: int, key: str = "model_version", timeout: float = 60.0
) -> dict:
    """Poll ``/healthz`` until ``3 x replicas`` answers in a row report ``version`` under
    ``key`` (replicas are picked at random by Serve); a reload error names the failure."""
    deadline = time.monotonic() + timeout
    streak, need = 0, 3 * max(replicas, 1)
    last: dict = {}
    while time.monotonic() < deadline:
        last = health(url)
        if last.get(key) == version:
            streak += 1
            if streak >= need:
                return last
        else:
            streak = 0
            time.sleep(0.2)
    raise UserError(
        f"{url}: replicas do not report {key} {version} after {timeout:.0f} s "
        f"(last /healthz: {last})"
    )


# ----------------------------------------------------------------------------- metrics
def scrape(urls: list[str]) -> dict:
    """``{(sample name, frozenset(labels but replica/worker ids)): value summed}`` over every
    Prometheus endpoint in ``urls`` (Ray's per-node metrics endpoints)."""
    from prometheus_client.parser import text_string_to_metric_families

    skip = {"WorkerId", "replica", "SessionName", "NodeAddress", "Component", "Version"}
    out: dict = {}
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                text = r.read().decode()
        except (urllib.error.URLError, OSError) as e:
            raise UserError(f"{url}: cannot read the metrics: {e}") from None
        for fam in text_string_to_metric_families(text):
            if "mixrank" not in fam.name:
                continue
            for s in fam.samples:
                key = (s.name, frozenset((k, v) for k, v in s.labels.items() if k not in skip))
                out[key] = out.get(key, 0.0) + s.value
    return out


def _sum(scr: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in scr.items() if n == name and want <= set(lab))


def _delta(after: dict, before: dict, name: str, **labels) -> float:
    return _sum(after, name, **labels) - _sum(before, name, **labels)


def quantile(after: dict, before: dict, hist: str, q: float, **labels) -> float | None:
    """``q``-quantile of a Prometheus histogram's increase between two scrapes, interpolated in
    its bucket as PromQL's ``histogram_quantile``."""
    buckets = {}
    for (n, lab), _ in after.items():
        if n == f"{hist}_bucket" and set(labels.items()) <= set(lab):
            le = dict(lab)["le"]
            bound = math.inf if le in ("+Inf", "inf") else float(le)
            buckets[bound] = _delta(after, before, n, **labels, le=le)
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank, lo, prev = q * total, 0.0, 0.0
    for b in bounds:
        if buckets[b] >= rank:
            if math.isinf(b):
                return lo
            return lo + (b - lo) * (rank - prev) / max(buckets[b] - prev, 1e-12)
        lo, prev = b, buckets[b]
    return bounds[-2] if len(bounds) > 1 else None


def shadow_report(after: dict, before: dict, version: str) -> dict:
    """The shadow's comparison from its counters: correlation and mean shift of its scores
    (y) against the served ones (x), over the candidates it scored; its p99 scoring time."""
    from serving.metrics import PREFIX, SHADOW_LATENCY, SHADOW_REQUESTS, SHADOW_SUMS

    s = {
        stat: _delta(after, before, PREFIX + SHADOW_SUMS, model_version=version, stat=stat)
        for stat in ("n", "x", "y", "xx", "yy", "xy")
    }
    req = {
        r: _delta(after, before, PREFIX + SHADOW_REQUESTS, model_version=version, result=r)
        for r in ("scored", "skipped", "failed")
    }
    n = s["n"]
    out = {"requests": req, "candidates": int(n)}
    if n > 1:
        mx, my = s["x"] / n, s["y"] / n
        vx, vy = s["xx"] / n - mx * mx, s["yy"] / n - my * my
        cov = s["xy"] / n - mx * my
        out["correlation"] = cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else None
        out["mean_served"], out["mean_new"], out["mean_shift"] = mx, my, my - mx
    out["p99_s"] = quantile(after, before, PREFIX + SHADOW_LATENCY, 0.99, model_version=version)
    return out


# ----------------------------------------------------------------------------- gate
def evaluate_artifact(path: str, data: str, batch_size: int = 8192) -> dict:
    """``mixrank eval``'s numbers of an artifact on ``data`` (AUC, logloss, NE per task)."""
    from ranking.data.reader import ParquetBatches
    from ranking.export import ArtifactError, load_artifact
    from ranking.metrics import EvalAccumulator

    try:
        art = load_artifact(path)
    except ArtifactError as e:
        raise UserError(str(e)) from e
    acc = EvalAccumulator(art.schema.task_names)
    for batch in ParquetBatches(art.schema, data, batch_size, rank=0, world_size=1, shuffle=False):
        acc.update(art.predict(batch), batch.labels)
    return acc.compute()


def _primary(m: dict) -> dict:
    """The first task's metrics of an evaluation (single- or multi-task)."""
    if "auc" in m:
        return m
    return next(v for v in m.values() if isinstance(v, dict) and "auc" in v)


def gate(
    new: str, current: str, data: str, max_auc_drop: float, max_ne_increase: float | None
) -> dict:
    """Evaluate both models on ``data``; ``RolloutRefused`` when ``new`` is worse than allowed."""
    m_new, m_cur = (
        _primary(evaluate_artifact(new, data)),
        _primary(evaluate_artifact(current, data)),
    )
    report = {
        "new": {k: m_new.get(k) for k in ("auc", "ne", "logloss", "rows")},
        "serving": {k: m_cur.get(k) for k in ("auc", "ne", "logloss", "rows")},
    }
    if m_new.get("auc") is None or m_cur.get("auc") is None:
        raise RolloutRefused(f"gate: AUC undefined on {data} (one class only?)")
    drop = m_cur["auc"] - m_new["auc"]
    if drop > max_auc_drop:
        raise RolloutRefused(
            f"gate refused {new}: AUC {m_new['auc']:.4f} against the serving model's "
            f"{m_cur['auc']:.4f} on {data} (a drop of {drop:.4f} > --max-auc-drop "
            f"{max_auc_drop}); the service is unchanged"
        )
    if max_ne_increase is not None and m_new["ne"] - m_cur["ne"] > max_ne_increase:
        raise RolloutRefused(
            f"gate refused {new}: NE {m_new['ne']:.4f} against {m_cur['ne']:.4f} "
            f"(> --max-ne-increase {max_ne_increase}); the service is unchanged"
        )
    return report


# ----------------------------------------------------------------------------- the commands
def _say(msg: str) -> None:
    print(f"rollout: {msg}", file=sys.stderr, flush=True)


def rollout(
    admin: ServeAdmin,
    new: str,
    *,
    url: str,
    gate_data: str | None = None,
    max_auc_drop: float = 0.002,
    max_ne_increase: float | None = None,
    shadow_seconds: float = 0.0,
    canary: float = 0.0,
    canary_seconds: float = 30.0,
    canary_key: str | None = None,
    metrics_urls: list[str] | None = None,
    promote: bool = True,
    timeout: float = 300.0,
) -> dict:
    """Roll ``new`` out (see the module docstring); returns the report of every step."""
    from ranking.export import ArtifactError, load_artifact
    from serving.model import load_validated

    new = str(Path(new).resolve()) if "://" not in new else new
    report: dict = {"artifact": new}
    uc = admin.ranker_user_config()
    current = uc.get("artifact", "")
    serving_version = health(url).get("model_version")
    report["serving"] = {"artifact": current, "model_version": serving_version}

    # 1. check, before the service is touched
    try:
        prev = load_artifact(current) if current and Path(current).exists() else None
        art = load_validated(new, None, prev)
    except ArtifactError as e:
        raise RolloutRefused(f"check refused {new}: {e}; the service is unchanged") from e
    version = art.model_version
    report["model_version"] = version
    _say(f"check: {new} is model {version}, compatible with the serving {serving_version}")
    if version == serving_version:
        _say("already serving this model: nothing to do")
        report["promoted"] = False
        return report

    # 2. gate
    if gate_data:
        if prev is None:
            raise UserError(f"gate: the serving artifact {current!r} is not readable here")
        report["gate"] = gate(new, current, gate_data, max_auc_drop, max_ne_increase)
        g = report["gate"]
        _say(
            f"gate: AUC {g['new']['auc']:.4f} (serving {g['serving']['auc']:.4f}), "
            f"NE {g['new']['ne']:.4f} (serving {g['serving']['ne']:.4f}) on {gate_data}: passed"
        )

    metrics_urls = metrics_urls or []
    replicas = admin.replicas()
    # 3. shadow
    if shadow_seconds > 0:
        before = scrape(metrics_urls) if metrics_urls else {}
        admin.update_ranker({"shadow_artifact": new}, timeout)
        wait_version(url, version, replicas, key="shadow_model_version")
        _say(f"shadow: {version} scores a copy of live traffic for {shadow_seconds:g} s")
        time.sleep(shadow_seconds)
        # The shadow is removed before its counters are read: a request still in flight would
        # otherwise be counted in one series (requests) and not yet in another (sums).
        admin.update_ranker({"shadow_artifact": ""}, timeout)
        wait_version(url, None, replicas, key="shadow_model_version")
        if metrics_urls:
            time.sleep(2.5)  # Ray exports metrics every second: the last ones reach the endpoint
        after = scrape(metrics_urls) if metrics_urls else {}
        if metrics_urls:
            sh = shadow_report(after, before, version)
            report["shadow"] = sh
            corr = sh.get("correlation")
            _say(
                f"shadow: {sh['requests']['scored']:.0f} requests ({sh['candidates']} "
                f"candidates) scored, {sh['requests']['skipped']:.0f} skipped; correlation "
                f"{'n/a' if corr is None else f'{corr:.4f}'}, mean shift "
                f"{sh.get('mean_shift', float('nan')):+.4f}, p99 "
                f"{_ms(sh['p99_s'])}"
            )
        else:
            _say("shadow: no --metrics-url, no comparison read")

    # 4. canary
    if canary > 0:
        before = scrape(metrics_urls) if metrics_urls else {}
        changes = {"canary_artifact": new, "canary_fraction": canary}
        if canary_key:
            changes["canary_key"] = canary_key
        admin.update_ranker(changes, timeout)
        wait_version(url, version, replicas, key="canary_model_version")
        _say(f"canary: {canary:.0%} of requests answered by {version} for {canary_seconds:g} s")
        time.sleep(canary_seconds)
        time.sleep(2.5)
        if metrics_urls:
            after = scrape(metrics_urls)
            report["canary"] = canary_report(after, before, version, serving_version)
            c = report["canary"]
            _say(
                f"canary: {c['new']['requests']:.0f} requests by {version} (p99 "
                f"{_ms(c['new']['p99_s'])}), {c['serving']['requests']:.0f} by the serving "
                f"model (p99 {_ms(c['serving']['p99_s'])})"
            )
        if not promote:
            admin.update_ranker({"canary_artifact": "", "canary_fraction": 0.0}, timeout)

    if not promote:
        report["promoted"] = False
        return report
    # 5. promote
    changes = {
        "artifact": new,
        "previous_artifact": current,
        "shadow_artifact": "",
        "canary_artifact": "",
        "canary_fraction": 0.0,
    }
    switch(admin, url, changes, version, uc, replicas, timeout)
    report["promoted"] = True
    _say(f"promoted: every replica serves {version} (rollback: mixrank rollback)")
    return report


def canary_report(after: dict, before: dict, new: str, serving: str) -> dict:
    from serving.metrics import PREFIX, VERSION_LATENCY, VERSION_REQUESTS

    out = {}
    for name, version, role in (("new", new, "canary"), ("serving", serving, "primary")):
        out[name] = {
            "model_version": version,
            "requests": _delta(
                after, before, PREFIX + VERSION_REQUESTS, model_version=version, role=role
            ),
            "p99_s": quantile(
                after, before, PREFIX + VERSION_LATENCY, 0.99, model_version=version, role=role
            ),
        }
    return out


def _ms(s: float | None) -> str:
    return "n/a" if s is None else f"{s * 1000:.1f} ms"


def switch(admin, url, changes, version, old: dict, replicas, timeout) -> None:
    """Apply ``changes`` (a new ``artifact``) and check every replica serves ``version``;
    otherwise put the old ``user_config`` back and fail."""
    admin.update_ranker(changes, timeout)
    try:
        wait_version(url, version, replicas)
    except UserError as e:
        err = health(url).get("last_reload_error")
        admin.update_ranker({k: old.get(k, "") for k in changes}, timeout)
        raise UserError(
            f"the replicas did not take model {version} ({err or e}); the config is back on "
            f"{old.get('artifact')}, which they kept serving"
        ) from None


def rollback(admin: ServeAdmin, *, url: str, timeout: float = 300.0) -> dict:
    """Serve ``previous_artifact`` again (the model before the last promotion)."""
    from ranking.export import ArtifactError, read_manifest

    uc = admin.ranker_user_config()
    previous, current = uc.get("previous_artifact", ""), uc.get("artifact", "")
    if not previous:
        raise UserError("rollback: no previous artifact recorded (user_config.previous_artifact)")
    try:
        version = read_manifest(previous)["model_version"]
    except ArtifactError as e:
        raise UserError(f"rollback: {e}") from e
    changes = {
        "artifact": previous,
        "previous_artifact": current,
        "shadow_artifact": "",
        "canary_artifact": "",
        "canary_fraction": 0.0,
    }
    switch(admin, url, changes, version, uc, admin.replicas(), timeout)
    print(f"rollback: every replica serves {version} from {previous}", file=sys.stderr)
    return {"artifact": previous, "model_version": version, "replaced": current}
