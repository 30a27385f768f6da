"""Mutual TLS (`--tls-client-ca`): only clients holding a certificate the CA signed are served.

The test makes its own CAs and certificates with `cryptography` (docs/security.md
shows the same with openssl).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import tempfile
from pathlib import Path

import grpc
import pytest

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

from rmserve.client import AsyncRewardClient, RewardClient, RewardServiceError  # noqa: E402

SAMPLE = [{"prompt": "hi", "response": "hello"}]


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def make_ca(name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue(ca, name: str, *, server: bool) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) signed by `ca`; SANs localhost and 127.0.0.1."""
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca, other_ca = make_ca("rmserve test CA"), make_ca("someone else's CA")
    files = {"ca.pem": ca[1].public_bytes(serialization.Encoding.PEM)}
    files["server.pem"], files["server.key"] = issue(ca, "rmserve", server=True)
    files["client.pem"], files["client.key"] = issue(ca, "trainer-7", server=False)
    files["stranger.pem"], files["stranger.key"] = issue(other_ca, "trainer-7", server=False)
    for name, data in files.items():
        (d / name).write_bytes(data)
    return {name.replace(".", "_"): d / name for name in files}


@pytest.fixture(scope="module")
def mtls_server(tiny_ensemble, pki):
    from rmserve.service.server.background import BackgroundServer
    from rmserve.service.server.config import ServerConfig

    s = BackgroundServer(ServerConfig(
        model=str(tiny_ensemble), port=0, metrics_port=None, registry=tempfile.mkdtemp(prefix="rmserve-registry-"),
        tls_cert=str(pki["server_pem"]), tls_key=str(pki["server_key"]), tls_client_ca=str(pki["ca_pem"]),
    )).start()
    yield s
    s.stop()


def test_a_client_with_a_certificate_from_the_ca_is_served(mtls_server, pki):
    # bytes, as gRPC takes them
    with RewardClient(mtls_server.address, timeout=30, root_certificates=pki["ca_pem"].read_bytes(),
                      certificate_chain=pki["client_pem"].read_bytes(), private_key=pki["client_key"].read_bytes()) as c:
        assert len(c.score(SAMPLE)) == 1
        assert c.health() is True

    async def go() -> float:  # paths, as they come from a config file
        async with AsyncRewardClient(mtls_server.address, timeout=30, root_certificates=str(pki["ca_pem"]),
                                     certificate_chain=pki["client_pem"], private_key=str(pki["client_key"])) as ac:
            return (await ac.score(SAMPLE))[0].reward

    assert isinstance(asyncio.run(go()), float)


def _refused(address: str, **tls) -> RewardServiceError:
    with RewardClient(address, timeout=20, max_retries=0, **tls) as c, pytest.raises(RewardServiceError) as err:
        c.score(SAMPLE)
    return err.value


def test_a_client_without_a_certificate_is_refused(mtls_server, pki):
    err = _refused(mtls_server.address, root_certificates=pki["ca_pem"].read_bytes())
    assert err.code == grpc.StatusCode.UNAVAILABLE  # the handshake fails: no RPC reaches the server
    with RewardClient(mtls_server.address, timeout=20, max_retries=0, root_certificates=pki["ca_pem"]) as c:
        assert c.health() is False  # not even the open health service answers


def test_a_client_with_a_certificate_from_another_ca_is_refused(mtls_server, pki):
    err = _refused(mtls_server.address, root_certificates=pki["ca_pem"].read_bytes(),
                   certificate_chain=pki["stranger_pem"].read_bytes(), private_key=pki["stranger_key"].read_bytes())
    assert err.code == grpc.StatusCode.UNAVAILABLE


def test_mtls_needs_the_servers_own_certificate(tiny_ensemble, pki):
    from rmserve.service.server.background import BackgroundServer
    from rmserve.service.server.config import ServerConfig

    with pytest.raises(ValueError, match="needs the server's own --tls-cert"):
        BackgroundServer(ServerConfig(model=str(tiny_ensemble), port=0, metrics_port=None,
                                      tls_client_ca=str(pki["ca_pem"]))).start()


def test_the_client_checks_its_certificate_arguments(pki):
    with pytest.raises(ValueError, match="both certificate_chain= and its private_key="):
        RewardClient("127.0.0.1:1", certificate_chain=pki["client_pem"])
    with pytest.raises(ValueError, match="cannot read"):
        RewardClient("127.0.0.1:1", certificate_chain=pki["client_pem"], private_key=str(pki["client_pem"]) + ".missing")
    with pytest.raises(ValueError, match="needs TLS"):
        RewardClient("127.0.0.1:1", tls=False, certificate_chain=pki["client_pem"], private_key=pki["client_key"])
    # PEM text works like bytes
    RewardClient("127.0.0.1:1", root_certificates=pki["ca_pem"].read_text()).close()
