"""The Kubernetes manifests parse, and what they name exists: the serve flags behind their
ROMEGW_* variables, the ports the probes and the Prometheus annotations point at."""

from __future__ import annotations

from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML reads the manifests (a dependency of transformers)")

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"


def docs() -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(K8S.glob("*.yaml"))}


def test_the_deployment_serves_probes_and_scrapes_what_the_gateway_listens_on() -> None:
    manifests = docs()
    assert set(manifests) == {"deployment.yaml", "service.yaml", "secret.example.yaml"}
    dep = manifests["deployment.yaml"]
    pod = dep["spec"]["template"]
    (gw,) = pod["spec"]["containers"]
    env = {e["name"]: e["value"] for e in gw["env"]}
    ports = {p["name"]: p["containerPort"] for p in gw["ports"]}
    assert ports == {"grpc": int(env["ROMEGW_PORT"]), "metrics": int(env["ROMEGW_METRICS_PORT"])}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert gw[probe]["grpc"]["port"] == ports["grpc"]  # the gRPC health service
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(ports["metrics"])
    assert gw["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert dep["spec"]["replicas"] > 1
    secret = manifests["secret.example.yaml"]
    assert gw["envFrom"][0]["secretRef"]["name"] == secret["metadata"]["name"]
    assert secret["stringData"]["ROMEGW_EDIT_STORE"].startswith("postgresql://")
    svc = manifests["service.yaml"]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == set(ports)


def test_every_variable_the_manifests_set_is_read_by_serve() -> None:
    """ROMEGW_<NAME> is the default of --<name> (romegw_client.cli.env): a misspelt one would be ignored."""
    from romegw_server.cli import build_parser

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    flags = {o for a in serve._actions for o in a.option_strings}
    manifests = docs()
    (gw,) = manifests["deployment.yaml"]["spec"]["template"]["spec"]["containers"]
    names = [e["name"] for e in gw["env"]] + list(manifests["secret.example.yaml"]["stringData"])
    for name in names:
        if name == "ROMEGW_TOKENS":  # read by the token table (server/auth.py), not a flag
            continue
        flag = "--" + name.removeprefix("ROMEGW_").lower().replace("_", "-")
        assert flag in flags, f"{name}: serve has no {flag}"
