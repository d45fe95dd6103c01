"""api/mtls.py and tls_setup.py: a client certificate's identity, the identities file, the
SPIFFE policy, the caller a certificate makes, and the TLS settings start-up refuses."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.method import IdempotencyLevel, MethodInfo, StreamType
from connectrpc.request import Headers, RequestContext

from metald.api.auth import TokenAuthenticator, TokenRefused, current_caller, current_customer
from metald.api.interceptors import AuthInterceptor
from metald.api.mtls import (
    CertificateAuthenticator,
    IdentitiesFile,
    IdentityMap,
    SpiffePolicy,
    current_peer,
    identity_of,
    peer_from_scope,
    trust_domain,
)
from metald.api.tls import TlsError
from metald.client._build import ClientSettings, TlsOptions, tls_options
from metald.config import load_settings
from metald.core.identity import Role
from metald.core.telemetry import NoTelemetry
from metald.gen.vmprovisioner.v1 import vm_pb2
from metald.tls_setup import tls_setup
from tests.tlscerts import Ca

CA = Ca()
ACME = "spiffe://example.org/tenant/acme"


def issued(common_name: str, **kw: object) -> str:
    return CA.issue(common_name, **kw).cert_pem.decode()  # type: ignore[arg-type]


# -- identities --------


def test_identity_is_the_spiffe_id_else_the_rfc4514_subject() -> None:
    spiffe = identity_of(issued("acme", uris=(ACME, "https://example.org/other")))
    assert (spiffe.id, spiffe.spiffe_id, spiffe.problem) == (ACME, ACME, None)
    subject = identity_of(issued("globex-ci", organization="Globex"))
    assert (subject.id, subject.spiffe_id) == ("O=Globex,CN=globex-ci", None)
    two = identity_of(issued("two", uris=(ACME, "spiffe://example.org/b")))
    assert two.problem is not None and two.spiffe_id is None
    assert trust_domain("spiffe://Example.ORG/a/b") == "example.org"


def test_peer_from_the_asgi_tls_extension() -> None:
    assert peer_from_scope({"type": "http", "extensions": {}}) is None
    tls = {"client_cert_chain": ["PEM"], "client_cert_name": "CN=x"}
    assert peer_from_scope({"extensions": {"tls": tls}}) == "PEM"
    assert peer_from_scope({"extensions": {"tls": {"client_cert_chain": []}}}) is None


def test_identities_file_format() -> None:
    identities = IdentityMap.parse(
        f"# a comment\n\nacme customer {ACME}\nops  operator CN=ops team,O=Example  \n"
        "- admin CN=root\n",
        "ids",
    )
    assert len(identities) == 3
    acme = identities.get(ACME)
    assert acme is not None and (acme.customer_id, acme.role) == ("acme", Role.CUSTOMER)
    ops = identities.get("CN=ops team,O=Example")
    assert ops is not None and ops.role is Role.OPERATOR
    root = identities.get("CN=root")  # `-`: an admin of no customer
    assert root is not None and (root.customer_id, root.role) == (None, Role.ADMIN)
    assert identities.get("CN=unknown") is None
    for bad, words in (
        ("acme customer", "expected"),
        ("acme boss CN=x", "role 'boss'"),
        ("bad/id customer CN=x", "customer id"),
        ("- customer CN=x", "needs its customer id"),  # a customer's identity must name it
        ("a customer CN=x\nb customer CN=x", "listed twice"),
    ):
        with pytest.raises(ValueError, match=words):
            IdentityMap.parse(bad, "ids")


def test_spiffe_policy() -> None:
    policy = SpiffePolicy(frozenset({"example.org"}))
    assert policy.refusal(identity_of(issued("a", uris=(ACME,)))) is None
    evil = identity_of(issued("e", uris=("spiffe://evil.org/tenant/acme",)))
    assert "trust domain 'evil.org'" in (policy.refusal(evil) or "")
    assert "no SPIFFE ID" in (policy.refusal(identity_of(issued("plain"))) or "")
    only = SpiffePolicy(frozenset({"example.org"}), frozenset({ACME}))
    other = identity_of(issued("b", uris=("spiffe://example.org/tenant/b",)))
    assert "is not accepted" in (only.refusal(other) or "")
    assert only.refusal(identity_of(issued("a", uris=(ACME,)))) is None


# -- the caller a certificate makes --------


def _auth(policy: SpiffePolicy | None = None) -> CertificateAuthenticator:
    identities = IdentityMap.parse(f"acme customer {ACME}\nops operator CN=ops", "ids")
    return CertificateAuthenticator(identities, policy)


TOKENS = TokenAuthenticator(dev_tokens=True)


async def test_a_known_certificate_is_its_customer() -> None:
    caller = await _auth().caller(issued("a", uris=(ACME,)), None, TOKENS)
    assert caller.actor == f"mtls:{ACME}" and caller.customer_id == "acme"
    assert caller.role is Role.CUSTOMER
    ops = await _auth().caller(issued("ops"), None, TOKENS)
    assert ops.role is Role.OPERATOR and ops.actor == "mtls:CN=ops"


async def test_refusals() -> None:
    auth = _auth(SpiffePolicy(frozenset({"example.org"})))
    acme = issued("a", uris=(ACME,))
    cases = [
        (None, None, "a client certificate is required"),
        (issued("stranger", uris=("spiffe://example.org/x",)), None, "unknown client certificate"),
        (issued("ops"), None, "no SPIFFE ID"),  # the policy wants SPIFFE IDs
        (acme, "Bearer dev_customer_globex", "another customer"),
        (acme, "Bearer nope", "invalid token"),
        (acme, "Basic x", "must be 'Bearer"),
    ]
    for peer, authorization, words in cases:
        with pytest.raises(TokenRefused, match=words):
            await auth.caller(peer, authorization, TOKENS)
    # A token for the same customer is fine: the certificate still names the actor.
    caller = await auth.caller(acme, "Bearer dev_customer_acme", TOKENS)
    assert caller.actor == f"mtls:{ACME}"


# -- settings --------


def _files(tmp_path: Path, mutual: bool = False) -> dict[str, str]:
    cert, key = CA.issue("metald", server=True).write(tmp_path, "server")
    env = {"tls_cert_file": str(cert), "tls_key_file": str(key)}
    if mutual:
        env["tls_ca_file"] = str(CA.write(tmp_path / "ca.pem"))
    return env


def test_settings_refused_at_start_up(tmp_path: Path) -> None:
    files = _files(tmp_path)
    identities = tmp_path / "ids"
    identities.write_text(f"acme customer {ACME}\n")
    cases: list[tuple[dict[str, object], str]] = [
        ({"tls_cert_file": files["tls_cert_file"]}, "MODE=disabled would serve plaintext"),
        ({"tls_mode": "file"}, "needs UNKEY_METALD_TLS_CERT_FILE"),
        ({"tls_mode": "file", **_files(tmp_path, True)}, "IDENTITIES_FILE must say"),
        ({"tls_mode": "file", "tls_identities_file": str(identities), **files}, "no UNKEY_"),
        ({"tls_mode": "file", "http_server": "uvicorn", **files}, "hypercorn only"),
        ({"tls_mode": "spiffe", **files}, "trust bundle"),
        ({"tls_mode": "spiffe", **_files(tmp_path, True)}, "SPIFFE_TRUST_DOMAINS"),
        (
            {
                "tls_mode": "spiffe",
                "tls_spiffe_trust_domains": "example.org",
                "tls_spiffe_allowed_ids": "acme",
                **_files(tmp_path, True),
            },
            "no spiffe:// ID",
        ),
        (
            {
                "tls_mode": "spiffe",
                "tls_spiffe_trust_domains": "example.org",
                "tls_spiffe_dir": str(tmp_path / "nowhere"),
            },
            "UNKEY_METALD_TLS_SPIFFE_DIR=",
        ),
        (
            {
                "tls_mode": "file",
                "tls_identities_file": str(tmp_path / "none"),
                **_files(tmp_path, True),
            },
            "IDENTITIES_FILE=",
        ),
    ]
    for overrides, words in cases:
        with pytest.raises(TlsError, match=words):
            tls_setup(load_settings(**overrides))


async def test_settings_that_serve(tmp_path: Path) -> None:
    assert tls_setup(load_settings()) is None
    plain = tls_setup(load_settings(tls_mode="file", **_files(tmp_path)))
    assert plain is not None and plain.certificates is None and not plain.tls.mutual
    spiffe_dir = tmp_path / "svid"
    server = CA.issue("metald", server=True, uris=("spiffe://example.org/metald",))
    spiffe_dir.mkdir()
    (spiffe_dir / "svid.pem").write_bytes(server.cert_pem)
    (spiffe_dir / "svid_key.pem").write_bytes(server.key_pem)
    (spiffe_dir / "svid_bundle.pem").write_bytes(CA.pem)
    identities = tmp_path / "ids"
    identities.write_text(f"acme customer {ACME}\n")
    spiffe = tls_setup(
        load_settings(
            tls_mode="spiffe", tls_spiffe_dir=str(spiffe_dir), tls_identities_file=str(identities),
            tls_spiffe_trust_domains="Example.org",
        )
    )  # fmt: skip
    assert spiffe is not None and spiffe.tls.mutual and spiffe.certificates is not None
    assert spiffe.tls.current.serial == server.serial
    caller = await spiffe.certificates.caller(issued("a", uris=(ACME,)), None, TOKENS)
    assert caller.customer_id == "acme"


# -- the SDK's options --------


def test_client_tls_options(tmp_path: Path) -> None:
    assert tls_options("http://127.0.0.1:8080", None, None, None) is None
    with pytest.raises(ValueError, match="https://"):
        tls_options("127.0.0.1:8080", tmp_path / "ca.pem", None, None)
    with pytest.raises(ValueError, match="needs its key"):
        tls_options("https://h:1", None, tmp_path / "c", None)
    options = tls_options("https://h:1", None, None, None)
    assert options == TlsOptions() and options.transport_arguments()["tls_include_system_certs"]
    with pytest.raises(ValueError, match="token must not be empty"):
        ClientSettings("https://h:1", None, 1.0, TlsOptions())
    cert, key = CA.issue("c").write(tmp_path, "c")
    settings = ClientSettings("https://h:1", None, 1.0, TlsOptions(None, cert, key))
    assert settings.headers == {}
    arguments = TlsOptions(CA.write(tmp_path / "ca.pem"), cert, key).transport_arguments()
    assert arguments["tls_ca_cert"] == CA.pem and not arguments["tls_include_system_certs"]
    assert arguments["tls_cert"] == cert.read_bytes() and arguments["tls_key"] == key.read_bytes()


# -- the auth interceptor with certificates ----------------------------------------------------


class Refusals(NoTelemetry):
    def __init__(self) -> None:
        self.reasons: list[str] = []

    def auth_refused(self, reason: str) -> None:
        self.reasons.append(reason)


def _ctx(headers: dict[str, str]) -> RequestContext[Any, Any]:
    method = MethodInfo(
        name="ListVms", service_name="vmprovisioner.v1.VmService", input=vm_pb2.ListVmsRequest,
        output=vm_pb2.ListVmsResponse, idempotency_level=IdempotencyLevel.UNKNOWN,
        stream_type=StreamType.UNARY,
    )  # fmt: skip
    return RequestContext(
        method=method, http_method="POST", request_headers=Headers(headers),
        client_address="127.0.0.1:5",
    )  # fmt: skip


async def test_the_interceptor_makes_the_certificates_caller(
    caplog: pytest.LogCaptureFixture,
) -> None:
    refusals = Refusals()
    interceptor = AuthInterceptor(TOKENS, refusals, _auth())
    seen: list[Any] = []

    async def call(peer: str | None, headers: dict[str, str]) -> None:
        if peer is not None:
            current_peer.set(peer)
        tokens = await interceptor.on_start(_ctx(headers))
        seen.append((current_caller.get(), current_customer.get()))
        await interceptor.on_end(tokens, _ctx(headers), None)

    await asyncio.create_task(call(issued("a", uris=(ACME,)), {"x-tenant-id": "t"}))
    caller, customer = seen[0]
    assert (caller.actor, caller.customer_id, customer) == (f"mtls:{ACME}", "acme", "acme")
    assert caller.tenant_header == "t" and caller.source == "127.0.0.1:5"
    # Without a certificate (another server, a test) and with an unknown one: refused, even
    # with a token that would have been good.
    messages = []
    for peer in (None, issued("stranger")):
        with pytest.raises(ConnectError) as refused:
            await asyncio.create_task(call(peer, {"authorization": "Bearer dev_customer_acme"}))
        assert refused.value.code is Code.UNAUTHENTICATED
        messages.append(refused.value.message)
    assert refusals.reasons == ["certificate", "certificate"]
    # the message names the identity, so an operator can add it (its security line and
    # audit row are the audit interceptor's)
    assert messages[1] == "unknown client certificate identity 'CN=stranger'"


def test_the_identities_file_is_reread_when_it_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "ids"
    path.write_text(f"acme customer {ACME}\n")
    identities = IdentitiesFile(path)
    assert identities.get("CN=ops") is None and not identities.check()
    # An operator rewrites it (a new file renamed over the old one, as editors and agents do).
    fresh = tmp_path / "ids.new"
    fresh.write_text("- operator CN=ops\n")
    fresh.rename(path)
    assert identities.check()
    ops = identities.get("CN=ops")
    assert ops is not None and ops.role is Role.OPERATOR
    assert identities.get(ACME) is None  # removed: refused from its next call on
    # A bad version is logged; the one read before stays.
    path.write_text("acme boss CN=x\n")
    with caplog.at_level(logging.ERROR, "metald.tls"):
        assert not identities.check()
    assert "identities file reload FAILED" in caplog.text
    assert identities.get("CN=ops") is not None
