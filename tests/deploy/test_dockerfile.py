"""What can be checked of the Dockerfile without a Docker engine: it parses, the files it
copies exist, it runs as a non-root user with volumes, ports and a health check, and its
entry point command works outside the container."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from tests.server.test_auth_tls import pki  # noqa: F401 - the certificates fixture

ROOT = Path(__file__).resolve().parents[2]
INSTRUCTIONS = {"FROM", "ARG", "ENV", "RUN", "WORKDIR", "COPY", "USER", "VOLUME", "EXPOSE", "HEALTHCHECK",
                "ENTRYPOINT", "CMD", "LABEL", "ADD", "SHELL", "STOPSIGNAL"}


def instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)  # line continuations
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_parses_and_is_complete() -> None:
    ins = instructions()
    words = [w for w, _ in ins]
    assert set(words) <= INSTRUCTIONS, set(words) - INSTRUCTIONS
    assert words[words.index("FROM") - 1] == "ARG" or words[0] == "ARG"  # the base is a build argument
    args = dict(rest.partition("=")[::2] for w, rest in ins if w == "ARG")
    assert "cuda" in args["BASE"]  # GPU base by default; the CPU image is a build argument away
    for w, rest in ins:
        if w == "COPY":
            *sources, _dest = shlex.split(rest)
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: no such path"
    users = [rest for w, rest in ins if w == "USER"]
    assert users and users[-1] not in ("root", "0")
    exposed = " ".join(rest for w, rest in ins if w == "EXPOSE").split()
    assert {"50051", "9400"} <= set(exposed)
    assert any(w == "VOLUME" and "/data" in rest and "/models" in rest for w, rest in ins)
    health = " ".join(rest for w, rest in ins if w == "HEALTHCHECK")
    assert "rome-gateway health" in health
    assert any(w == "ENTRYPOINT" and "rome-gateway" in rest for w, rest in ins)


def test_entry_point_runs_outside_the_container() -> None:
    exe = Path(sys.executable).with_name("rome-gateway")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "romegw_server.cli"]
    out = subprocess.run([*cmd, "serve", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--edit-store" in out.stdout and "--metrics-port" in out.stdout
    # the health check command fails cleanly (exit 2, an UNAVAILABLE line) when nothing listens
    env = {**os.environ, "ROMEGW_TARGET": "127.0.0.1:1"}
    out = subprocess.run([*cmd, "health", "--timeout", "3"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode != 0 and "UNAVAILABLE" in out.stderr


def image_env() -> dict[str, str]:
    """The ENV of the image (``ENV A=1 B=2`` lines)."""
    env = {}
    for w, rest in instructions():
        if w == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def healthcheck_command() -> str:
    health = " ".join(rest for w, rest in instructions() if w == "HEALTHCHECK")
    return health.partition(" CMD ")[2].strip()


def test_healthcheck_and_environment_are_consistent() -> None:
    from romegw_server.cli import build_parser

    env, cmd = image_env(), healthcheck_command()
    # health reads the TLS settings from the environment: no TLS flag in the command, the server's own port
    assert cmd.startswith("rome-gateway health --target 127.0.0.1:${ROMEGW_PORT}") and "--tls" not in cmd
    assert env["ROMEGW_PORT"] == "50051" and float(env["ROMEGW_PRESTOP_SECONDS"]) > 0
    # every ROMEGW_ variable the Dockerfile names is one a command reads
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    read = {"ROMEGW_TOKEN", "ROMEGW_TOKENS"}  # the bearer tokens: never flags
    for name in ("serve", "health"):
        for action in sub.choices[name]._actions:
            read |= {"ROMEGW_" + o.lstrip("-").upper().replace("-", "_") for o in action.option_strings}
    named = set(re.findall(r"ROMEGW_[A-Z_]+", (ROOT / "Dockerfile").read_text()))
    assert named <= read, named - read
    assert {"ROMEGW_TLS_CA", "ROMEGW_TLS_SERVER_NAME", "ROMEGW_TLS_CLIENT_CERT", "ROMEGW_TLS_CLIENT_KEY"} <= named


def test_healthcheck_command_passes_against_a_mutual_tls_server(tiny_llama, serve, pki) -> None:  # noqa: F811
    """The HEALTHCHECK line as the container runs it (sh -c, the image's ENV plus TLS secrets)."""
    from romegw_server.main import TlsConfig

    srv = serve(tiny_llama, tls=TlsConfig(pki["named_cert"], pki["named_key"], client_ca=pki["ca"]))
    exe = Path(sys.executable).with_name("rome-gateway")
    cmd = healthcheck_command().replace("rome-gateway", shlex.quote(str(exe)), 1)
    romegw = {k: v for k, v in image_env().items() if k.startswith("ROMEGW_")}
    env = {**os.environ, **romegw, "ROMEGW_PORT": str(srv.port), "ROMEGW_TLS_CERT": str(pki["named_cert"]),
           "ROMEGW_TLS_KEY": str(pki["named_key"]), "ROMEGW_TLS_CA": str(pki["ca"]),
           "ROMEGW_TLS_SERVER_NAME": "gateway.test"}
    out = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode != 0  # no client certificate
    env |= {"ROMEGW_TLS_CLIENT_CERT": str(pki["cli_cert"]), "ROMEGW_TLS_CLIENT_KEY": str(pki["cli_key"])}
    out = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "SERVING", out.stderr[-2000:]
