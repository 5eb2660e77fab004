"""Tokens with roles, TLS with a self-signed certificate made here, mutual TLS, exposure rules."""

from __future__ import annotations

import datetime
import ipaddress
import logging
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from romegw_client import Client, PermissionDenied, Unauthenticated, Unavailable, channel_credentials
from romegw_server.auth import TokenTable, load_tokens
from romegw_server.main import ServerConfig, TlsConfig, check_exposure

GEN = "generate-token-0123456789abcdef"
EDIT = "edit-token-fedcba9876543210abcd"
FAST = {"v_num_grad_steps": 2, "mom2_n_tokens": 1000, "ctx_n_short": 1, "ctx_n_long": 1}


def tokens() -> TokenTable:
    return TokenTable([("generate", GEN, "frontend"), ("edit", EDIT, "alice")])


def test_roles(tiny_llama, serve, caplog) -> None:
    srv = serve(tiny_llama, edits=True, tokens=tokens())
    with Client(srv.target) as c, pytest.raises(Unauthenticated, match="missing"):
        c.generate_text("Hi", max_new_tokens=2)
    with Client(srv.target, token="wrong-token-0000000000") as c, pytest.raises(Unauthenticated, match="unknown"):
        c.generate_text("Hi", max_new_tokens=2)
    with Client(srv.target, token=GEN) as c:
        assert c.generate_text("Hi", max_new_tokens=2).completion_tokens == 2
        assert c.model_info().family == "llama"
        assert c.list_edits().edits == ()
        assert c.health() == "SERVING"  # health needs no token
        with pytest.raises(PermissionDenied, match="'edit' role"):
            c.apply_edit("{} lives in", "Alice Smith", " Paris", hparams=FAST)
        with pytest.raises(PermissionDenied):
            c.export_edits()
    with caplog.at_level(logging.INFO, logger="romegw.audit"), Client(srv.target, token=EDIT, timeout=600) as c:
        r = c.apply_edit("{} lives in", "Alice Smith", " Paris", hparams=FAST, author="alice")
        assert r.head_version == 1
        c.revert_edit(to_version=0)
    audit = [r.getMessage() for r in caplog.records if r.name == "romegw.audit"]
    assert any("who=alice what=ApplyEdit version_before=0 version_after=1" in line for line in audit)
    assert any("what=RevertEdit version_before=1 version_after=0" in line for line in audit)
    everything = "\n".join(r.getMessage() for r in caplog.records)
    assert GEN not in everything and EDIT not in everything  # tokens never reach the logs


def test_tokens_from_file_and_env(tmp_path) -> None:
    f = tmp_path / "tokens"
    f.write_text(f"# role token name\nedit {EDIT} alice\n\ngenerate {GEN}\n")
    table = load_tokens(f, env="generate:another-generate-token-1234 web")
    assert len(table) == 3
    assert table.authorize(f"Bearer {GEN}", "ApplyEdit").code == grpc.StatusCode.PERMISSION_DENIED
    assert table.authorize(f"Bearer {EDIT}", "ApplyEdit").code is None
    assert table.authorize("Bearer another-generate-token-1234", "Generate").name == "web"
    with pytest.raises(ValueError, match="unknown role"):
        TokenTable([("admin", EDIT, "")])
    with pytest.raises(ValueError, match="shorter"):
        TokenTable([("edit", "short", "")])


def test_no_tokens_means_loopback_only() -> None:
    check_exposure(ServerConfig(host="127.0.0.1"))
    check_exposure(ServerConfig(host="::1"))
    with pytest.raises(ValueError, match="insecure-allow-remote"):
        check_exposure(ServerConfig(host="0.0.0.0"))
    check_exposure(ServerConfig(host="0.0.0.0", insecure_allow_remote=True))
    check_exposure(ServerConfig(host="0.0.0.0", tokens=tokens()))


# ------------------------------------------------------------------ TLS


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer_name: x509.Name, issuer_key, *, ca: bool, san: bool | str = False):
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:  # True: localhost and 127.0.0.1; a string: that DNS name only
        names = (
            [x509.DNSName(san)]
            if isinstance(san, str)
            else [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        )
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("romegw test CA", ca_key, _name("romegw test CA"), ca_key, ca=True)
    srv_key = ec.generate_private_key(ec.SECP256R1())
    srv = _cert("localhost", srv_key, ca.subject, ca_key, ca=False, san=True)
    cli_key = ec.generate_private_key(ec.SECP256R1())
    cli = _cert("client", cli_key, ca.subject, ca_key, ca=False)
    named_key = ec.generate_private_key(ec.SECP256R1())  # a production-like certificate: no 127.0.0.1 in it
    named = _cert("gateway.test", named_key, ca.subject, ca_key, ca=False, san="gateway.test")
    files = {
        "named_cert": named.public_bytes(serialization.Encoding.PEM),
        "named_key": _pem_key(named_key),
        "ca": ca.public_bytes(serialization.Encoding.PEM),
        "srv_cert": srv.public_bytes(serialization.Encoding.PEM),
        "srv_key": _pem_key(srv_key),
        "cli_cert": cli.public_bytes(serialization.Encoding.PEM),
        "cli_key": _pem_key(cli_key),
    }
    out = {}
    for name, data in files.items():
        (d / name).write_bytes(data)
        out[name] = d / name
    return out


def test_tls_with_a_self_signed_certificate(tiny_llama, serve, pki) -> None:
    srv = serve(tiny_llama, tls=TlsConfig(pki["srv_cert"], pki["srv_key"]))
    creds = channel_credentials(pki["ca"].read_bytes())
    with Client(srv.target, credentials=creds) as c:
        assert c.generate_text("Hi", max_new_tokens=2).completion_tokens == 2
    with Client(srv.target, timeout=3) as c, pytest.raises(Unavailable):  # plaintext to a TLS port
        c.model_info()


def test_mutual_tls_needs_a_client_certificate(tiny_llama, serve, pki) -> None:
    srv = serve(tiny_llama, tls=TlsConfig(pki["srv_cert"], pki["srv_key"], client_ca=pki["ca"]))
    ca = pki["ca"].read_bytes()
    with Client(srv.target, credentials=channel_credentials(ca), timeout=3) as c, pytest.raises(Unavailable):
        c.model_info()
    mtls = channel_credentials(ca, pki["cli_key"].read_bytes(), pki["cli_cert"].read_bytes())
    with Client(srv.target, credentials=mtls) as c:
        assert c.model_info().family == "llama"


# ------------------------------------------------------------------ the role allow-list


def test_the_role_table_is_an_allow_list() -> None:
    table = tokens()
    for token in (GEN, EDIT):  # an RPC no role names is refused, even for the edit role
        decision = table.authorize(f"Bearer {token}", "NewThing")
        assert decision.code == grpc.StatusCode.PERMISSION_DENIED and "not open to any role" in decision.message
    assert table.authorize(f"Bearer {GEN}", "Generate").code is None
    assert table.authorize(f"Bearer {EDIT}", "Generate").code is None
    assert table.authorize(f"Bearer {EDIT}", "ImportEdits").code is None
    decision = table.authorize(f"Bearer {GEN}", "ImportEdits")
    assert decision.code == grpc.StatusCode.PERMISSION_DENIED and "'edit' role" in decision.message


def test_an_rpc_no_role_names_is_refused_before_lookup(tiny_llama, serve) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    srv = serve(tiny_llama, tokens=tokens())
    with grpc.insecure_channel(srv.target) as ch:
        unary = ch.unary_unary("/romegw.v1.RomeGateway/NewThing")  # bytes in, bytes out
        stream = ch.stream_stream("/romegw.v1.RomeGateway/NewStream")
        for token in (GEN, EDIT):
            auth = (("authorization", f"Bearer {token}"),)
            with pytest.raises(grpc.RpcError) as err:
                unary(b"", metadata=auth, timeout=10)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED  # not UNIMPLEMENTED
            with pytest.raises(grpc.RpcError) as err:
                list(stream(iter([b""]), metadata=auth, timeout=10))
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as err:  # no token: authentication comes first
            unary(b"", timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # health and reflection stay open without a token
        assert "romegw.v1.RomeGateway" in ProtoReflectionDescriptorDatabase(ch).get_services()
    with Client(srv.target) as c:
        assert c.health() == "SERVING"


def test_plaintext_tokens_beyond_loopback_are_warned_about(tiny_llama, serve, pki, caplog) -> None:
    def warnings(**config: object) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            serve(tiny_llama, tokens=tokens(), **config)
        lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        return [line for line in lines if "PLAINTEXT" in line]

    (line,) = warnings(host="0.0.0.0")
    assert "0.0.0.0" in line and "--tls-cert" in line
    assert warnings(host="127.0.0.1") == []
    assert warnings(host="0.0.0.0", tls=TlsConfig(pki["srv_cert"], pki["srv_key"])) == []


# ------------------------------------------------------------------ client commands under TLS

TLS_ENV = ("ROMEGW_TLS_CERT", "ROMEGW_TLS_KEY", "ROMEGW_TLS_CA", "ROMEGW_TLS_SERVER_NAME", "ROMEGW_TLS_CLIENT_CERT",
           "ROMEGW_TLS_CLIENT_KEY", "ROMEGW_TOKEN", "ROMEGW_TARGET")


def run_cli(monkeypatch, capsys, argv: list[str], env: dict[str, object]) -> tuple[int, str]:
    """``rome-gateway ARGV`` in this process, with exactly ``env`` among the TLS variables."""
    from romegw_server import cli

    for name in TLS_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    code = cli.main(argv)
    return code, capsys.readouterr().out


def test_health_command_under_tls_with_the_environment_only(tiny_llama, serve, pki, monkeypatch, capsys) -> None:
    # a production-like certificate names gateway.test; the health check connects to 127.0.0.1
    srv = serve(tiny_llama, tls=TlsConfig(pki["named_cert"], pki["named_key"]))
    env = {"ROMEGW_TARGET": srv.target, "ROMEGW_TLS_CERT": pki["named_cert"], "ROMEGW_TLS_KEY": pki["named_key"],
           "ROMEGW_TLS_CA": pki["ca"]}
    health = ["health", "--timeout", "5"]
    assert run_cli(monkeypatch, capsys, health, {**env, "ROMEGW_TLS_SERVER_NAME": "gateway.test"}) == (0, "SERVING\n")
    # the name is verified, not skipped
    assert run_cli(monkeypatch, capsys, health, env)[0] == 2
    assert run_cli(monkeypatch, capsys, health, {**env, "ROMEGW_TLS_SERVER_NAME": "other.test"})[0] == 2


def test_client_certificates_for_mutual_tls(tiny_llama, serve, pki, monkeypatch, capsys) -> None:
    from romegw_client import tls_credentials

    srv = serve(tiny_llama, tls=TlsConfig(pki["named_cert"], pki["named_key"], client_ca=pki["ca"]))
    env = {"ROMEGW_TARGET": srv.target, "ROMEGW_TLS_CERT": pki["named_cert"], "ROMEGW_TLS_KEY": pki["named_key"],
           "ROMEGW_TLS_CA": pki["ca"], "ROMEGW_TLS_SERVER_NAME": "gateway.test"}
    health = ["health", "--timeout", "5"]
    assert run_cli(monkeypatch, capsys, health, env)[0] == 2  # no client certificate: refused
    client_env = {"ROMEGW_TLS_CLIENT_CERT": pki["cli_cert"], "ROMEGW_TLS_CLIENT_KEY": pki["cli_key"]}
    assert run_cli(monkeypatch, capsys, health, {**env, **client_env}) == (0, "SERVING\n")
    # the same as flags, for any client command, with no environment at all
    flags = ["--target", srv.target, "--tls-ca", str(pki["ca"]), "--tls-server-name", "gateway.test",
             "--tls-client-cert", str(pki["cli_cert"]), "--tls-client-key", str(pki["cli_key"])]
    code, out = run_cli(monkeypatch, capsys, ["info", *flags], {})
    assert code == 0 and "llama" in out
    with pytest.raises(SystemExit, match="go together"):
        run_cli(monkeypatch, capsys, ["info", *flags[:-2]], {})
    # and through the SDK
    creds = tls_credentials(pki["ca"], pki["cli_cert"], pki["cli_key"])
    with Client(srv.target, credentials=creds, tls_server_name="gateway.test") as c:
        assert c.model_info().family == "llama"
