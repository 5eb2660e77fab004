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


def test_roles(tiny_llama, serve, caplog) -> None:  # noqa: ANN001
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


def test_tokens_from_file_and_env(tmp_path) -> None:  # noqa: ANN001
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


def _cert(subject: str, key, issuer_name: x509.Name, issuer_key, *, ca: bool, san: bool = False):  # noqa: ANN001, ANN202
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
    if san:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return b.sign(issuer_key, hashes.SHA256())


def _pem_key(key) -> bytes:  # noqa: ANN001
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:  # noqa: ANN001
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("romegw test CA", ca_key, _name("romegw test CA"), ca_key, ca=True)
    srv_key = ec.generate_private_key(ec.SECP256R1())
    srv = _cert("localhost", srv_key, ca.subject, ca_key, ca=False, san=True)
    cli_key = ec.generate_private_key(ec.SECP256R1())
    cli = _cert("client", cli_key, ca.subject, ca_key, ca=False)
    files = {
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


def test_tls_with_a_self_signed_certificate(tiny_llama, serve, pki) -> None:  # noqa: ANN001
    srv = serve(tiny_llama, tls=TlsConfig(pki["srv_cert"], pki["srv_key"]))
    creds = channel_credentials(pki["ca"].read_bytes())
    with Client(srv.target, credentials=creds) as c:
        assert c.generate_text("Hi", max_new_tokens=2).completion_tokens == 2
    with Client(srv.target, timeout=3) as c, pytest.raises(Unavailable):  # plaintext to a TLS port
        c.model_info()


def test_mutual_tls_needs_a_client_certificate(tiny_llama, serve, pki) -> None:  # noqa: ANN001
    srv = serve(tiny_llama, tls=TlsConfig(pki["srv_cert"], pki["srv_key"], client_ca=pki["ca"]))
    ca = pki["ca"].read_bytes()
    with Client(srv.target, credentials=channel_credentials(ca), timeout=3) as c, pytest.raises(Unavailable):
        c.model_info()
    mtls = channel_credentials(ca, pki["cli_key"].read_bytes(), pki["cli_cert"].read_bytes())
    with Client(srv.target, credentials=mtls) as c:
        assert c.model_info().family == "llama"
