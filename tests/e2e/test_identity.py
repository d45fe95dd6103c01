"""Identity end to end (issue 10): API keys made with `metald keys`, JWTs against a JWKS
file and a JWKS URL, and roles, against the real daemon with curl and grpcio.

- keys: created with the CLI on the daemon's database, a call with curl and with grpcio,
  revoked with the CLI and refused on the SAME open grpcio channel (one HTTP/2 connection)
  at its next call; an expired key refused; a wrong secret refused;
- JWT (RS256, ES256, EdDSA made here with `cryptography`): good; expired, not yet valid,
  wrong audience, wrong issuer, tampered signature, `alg: none`, HS256 signed with the
  public key, unknown kid, a missing customer claim: refused; the JWKS file rotated (the
  new key works, the removed one no longer does); a JWKS URL served by a loopback
  http.server of this test, rotated too;
- roles: a customer cannot list another customer's VMs (permission_denied) and sees only
  its own; an operator (key) lists every customer's VMs and one customer's, creates a VM
  for a customer, reads and deletes it; every operator call is an audit row under the
  customer whose VM it touched (`metald audit list --customer`).
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import pwd
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from metald.gen.metald.admin.v1 import admin_pb2

from ._support import (
    METALD,
    MIB,
    CurlConnect,
    Daemon,
    Grpcio,
    client_env,
    curl_raw,
    wait_until,
)

ISSUER, AUDIENCE = "https://idp.test", "metald-e2e"
SMALL = {"config": {"memory": {"size_bytes": 128 * MIB}}}


# -- keys and tokens made here ----------------------------------------------------------------


class SigningKey:
    def __init__(self, kind: str, kid: str) -> None:
        self.kid = kid
        if kind == "RS256":
            self.private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.private.public_key()))
        elif kind == "ES256":
            self.private = ec.generate_private_key(ec.SECP256R1())
            self.jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.private.public_key()))
        else:
            self.private = ed25519.Ed25519PrivateKey.generate()
            self.jwk = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(self.private.public_key()))
        self.alg = "EdDSA" if kind == "Ed" else kind
        self.jwk.update(kid=kid, use="sig")

    def public_pem(self) -> bytes:
        return bytes(
            self.private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def token(self, **overrides: Any) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "acme",
            "iat": now,
            "exp": now + 600,
        }
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        return jwt.encode(claims, self.private, algorithm=self.alg, headers={"kid": self.kid})


def jwks(*keys: SigningKey) -> bytes:
    return json.dumps({"keys": [k.jwk for k in keys]}).encode()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(claims: dict[str, Any], header: dict[str, Any]) -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}."


# -- the daemon and its CLI -------------------------------------------------------------------


def cli(daemon: Daemon, *args: str) -> str:
    """`metald <args>` on the daemon's database (as its host's operator runs it)."""
    out = subprocess.run(
        [str(METALD), *args],
        env={**client_env(), **daemon.env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, f"metald {args}: {out.stderr}"
    return out.stdout.strip()


def keys_cli(daemon: Daemon, *args: str) -> str:
    return cli(daemon, "keys", *args)


def new_key(daemon: Daemon, *args: str) -> tuple[str, str]:
    made = json.loads(keys_cli(daemon, "create", "--json", *args))
    return made["key_id"], made["token"]


@pytest.fixture
def pepper(tmp_path: Path) -> Path:
    path = tmp_path / "pepper"
    path.write_bytes(b"e2e-pepper-" + bytes(range(32)).hex().encode())
    path.chmod(0o600)
    return path


@pytest.fixture
def keyed(metald_factory: Callable[..., Daemon], pepper: Path) -> Daemon:
    return metald_factory(
        UNKEY_METALD_AUTH_API_KEYS="true", UNKEY_METALD_AUTH_PEPPER_FILE=str(pepper)
    )


@pytest.fixture
def grpc_callers() -> Iterator[list[Grpcio]]:
    made: list[Grpcio] = []
    yield made
    for each in made:
        each.close()


# -- API keys ---------------------------------------------------------------------------------


def test_a_key_works_with_curl_and_grpcio_until_revoked_on_the_open_channel(
    keyed: Daemon, grpc_callers: list[Grpcio]
) -> None:
    key_id, token = new_key(keyed, "--customer", "acme", "--description", "e2e")
    curl = CurlConnect(keyed.url, token)
    channel = Grpcio(keyed.url, token)
    grpc_callers.append(channel)
    assert curl.must("ListVms").body["total_count"] == 0
    assert channel.must("ListVms").body["total_count"] == 0
    wrong = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    assert curl("ListVms", token=wrong).code == "unauthenticated"
    listed = json.loads(keys_cli(keyed, "list", "--json"))
    assert [(k["key_id"], k["customer_id"], k["status"]) for k in listed] == [
        (key_id, "acme", "active")
    ]
    assert token.split("_")[-1] not in json.dumps(listed)  # the secret is never shown again
    keys_cli(keyed, "revoke", key_id)
    # The same channel (one HTTP/2 connection, already authenticated once) is refused at
    # its very next call: nothing is cached.
    refused = channel("ListVms")
    assert refused.code == "unauthenticated" and "revoked" in refused.message
    assert curl("ListVms").code == "unauthenticated"
    assert json.loads(keys_cli(keyed, "list", "--json"))[0]["status"] == "revoked"
    # No secret and no hash in the daemon's log.
    assert token.split("_")[-1] not in keyed.log_tail(1000)


def test_an_expired_key_is_refused(keyed: Daemon) -> None:
    _, token = new_key(keyed, "--customer", "acme", "--expires", "1s")
    time.sleep(1.2)  # past its expiry (an absolute time): refused whenever it is checked
    refused = CurlConnect(keyed.url, token)("ListVms")
    assert refused.code == "unauthenticated" and "expired" in refused.message


def test_a_customer_cannot_list_another_customer_and_an_operator_lists_all(
    keyed: Daemon,
) -> None:
    acme = CurlConnect(keyed.url, "dev_customer_acme")
    globex = CurlConnect(keyed.url, "dev_user_globex")  # the older clients' dev token
    _, ops_token = new_key(keyed, "--role", "operator", "--description", "ops")
    ops = CurlConnect(keyed.url, ops_token)
    vm_a = acme.must("CreateVm", SMALL).body["vm_id"]
    vm_g = globex.must("CreateVm", SMALL).body["vm_id"]
    try:
        refused = acme("ListVms", {"customer_id": "globex"})
        assert refused.code == "permission_denied"
        assert [v["vm_id"] for v in acme.must("ListVms").body["vms"]] == [vm_a]
        assert acme("GetVmInfo", {"vm_id": vm_g}).code == "not_found"
        every = ops.must("ListVms").body
        assert {(v["vm_id"], v["customer_id"]) for v in every["vms"]} == {
            (vm_a, "acme"),
            (vm_g, "globex"),
        }
        only = ops.must("ListVms", {"customer_id": "globex"}).body
        assert [v["vm_id"] for v in only["vms"]] == [vm_g]
        # An operator acts on a customer's VM, and creates one for a named customer.
        assert ops.must("GetVmInfo", {"vm_id": vm_g}).body["vm_id"] == vm_g
        assert ops("CreateVm", SMALL).code == "invalid_argument"  # for whom?
        made = ops.must("CreateVm", {**SMALL, "customer_id": "acme"}).body["vm_id"]
        assert {v["vm_id"] for v in acme.must("ListVms").body["vms"]} == {vm_a, made}
        ops.must("DeleteVm", {"vm_id": made, "force": True})
    finally:
        acme("DeleteVm", {"vm_id": vm_a, "force": True})
        globex("DeleteVm", {"vm_id": vm_g, "force": True})


def test_an_operators_calls_are_audited_under_the_customer_they_touched(keyed: Daemon) -> None:
    acme = CurlConnect(keyed.url, "dev_customer_acme")
    ops_id, ops_token = new_key(keyed, "--role", "operator")
    ops = CurlConnect(keyed.url, ops_token)
    vm = acme.must("CreateVm", SMALL).body["vm_id"]
    try:
        ops.must("GetVmInfo", {"vm_id": vm})
        ops.must("ListVms", {"customer_id": "acme"})
        ops.must("ListVms")  # every customer's: a row, but under no customer
        assert acme("ListVms", {"customer_id": "globex"}).code == "permission_denied"
    finally:
        ops.must("DeleteVm", {"vm_id": vm, "force": True})
    assert keyed.stop() == 0  # a clean stop writes every queued row
    rows = [json.loads(line) for line in cli(keyed, "audit", "list", "--customer", "acme",
                                             "--json").splitlines()]  # fmt: skip
    seen = [(r["method"].rsplit("/", 1)[1], r["actor"], r["role"], r["vm_id"], r["code"])
            for r in rows]  # fmt: skip
    operator = (f"key:{ops_id}", "operator")
    assert seen == [
        ("CreateVm", "dev:acme", "customer", vm, "ok"),
        ("GetVmInfo", *operator, vm, "ok"),
        ("ListVms", *operator, None, "ok"),
        ("ListVms", "dev:acme", "customer", None, "permission_denied"),
        ("DeleteVm", *operator, vm, "ok"),
    ], rows
    every = [json.loads(line) for line in cli(keyed, "audit", "list", "--json").splitlines()]
    nobodys = [(r["method"], r["actor"]) for r in every if not r["customer_id"]]
    assert nobodys == [
        (f"metald keys create {ops_id}", f"cli:{pwd.getpwuid(os.getuid()).pw_name}"),
        ("vmprovisioner.v1.VmService/ListVms", operator[0]),
    ]
    assert "the chain holds" in cli(keyed, "audit", "verify")


ADMIN_SERVICE = "metald.admin.v1.AdminService"


def admin_call(
    daemon: Daemon, method: str, body: dict[str, Any], token: str
) -> tuple[int, dict[str, Any]]:
    """curl, Connect JSON, to the AdminService: (HTTP status, JSON body)."""
    status, text = curl_raw(
        f"{daemon.url}/{ADMIN_SERVICE}/{method}",
        json.dumps(body).encode(),
        {"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    return status, json.loads(text) if text.strip() else {}


def test_an_admin_manages_keys_and_quotas_over_the_api(keyed: Daemon) -> None:
    root_id, root = new_key(keyed, "--role", "admin", "--description", "root")
    _, ops = new_key(keyed, "--role", "operator")
    # Keys and quotas are the admin's: an operator and a customer are refused.
    for token in (ops, "dev_customer_acme"):
        status, body = admin_call(keyed, "ListApiKeys", {}, token)
        assert (status, body.get("code")) == (403, "permission_denied"), body
    status, made = admin_call(
        keyed, "CreateApiKey",
        {"customerId": "acme", "role": "customer", "expiresInSeconds": 3600}, root,
    )  # fmt: skip
    assert status == 200, made
    acme_key, acme_token = made["key"]["keyId"], made["token"]
    assert made["key"]["status"] == "active" and made["key"]["customerId"] == "acme"
    acme = CurlConnect(keyed.url, acme_token)
    assert acme.must("ListVms").body.get("vms", []) == []
    # grpcio, a generic unary call with the generated messages: the key is listed.
    channel = grpc.insecure_channel(keyed.url.removeprefix("http://"))
    try:
        list_keys = channel.unary_unary(
            f"/{ADMIN_SERVICE}/ListApiKeys",
            request_serializer=admin_pb2.ListApiKeysRequest.SerializeToString,
            response_deserializer=admin_pb2.ListApiKeysResponse.FromString,
        )
        reply = list_keys(
            admin_pb2.ListApiKeysRequest(), metadata=[("authorization", f"Bearer {root}")],
            timeout=30,
        )  # fmt: skip
        assert {k.key_id for k in reply.keys} >= {root_id, acme_key}
    finally:
        channel.close()
    # Quotas: acme may hold one VM; its second create is refused.
    status, quota = admin_call(
        keyed, "SetQuota", {"customerId": "acme", "changes": [{"resource": "vms", "limit": 1}]},
        root,
    )  # fmt: skip
    assert status == 200, quota
    vms = next(q for q in quota["quotas"] if q["resource"] == "vms")
    assert vms["limit"] in (1, "1") and vms["override"] is True
    first = acme.must("CreateVm", SMALL).body["vm_id"]
    try:
        assert acme("CreateVm", SMALL).code == "resource_exhausted"
        status, quota = admin_call(keyed, "GetQuota", {"customerId": "acme"}, root)
        used = next(q for q in quota["quotas"] if q["resource"] == "vms")
        assert used.get("used") in (1, "1"), quota
    finally:
        acme.must("DeleteVm", {"vm_id": first, "force": True})
    status, bad = admin_call(
        keyed, "SetQuota", {"customerId": "acme", "changes": [{"resource": "cats", "limit": 1}]},
        root,
    )  # fmt: skip
    assert (status, bad.get("code")) == (400, "invalid_argument"), bad
    # Revoked over the API: refused at once; the CLI sees what the API did.
    status, revoked = admin_call(keyed, "RevokeApiKey", {"keyId": acme_key}, root)
    assert status == 200 and revoked["key"]["status"] == "revoked", revoked
    assert acme("ListVms").code == "unauthenticated"
    listed = {k["key_id"]: k["status"] for k in json.loads(keys_cli(keyed, "list", "--json"))}
    assert listed[acme_key] == "revoked" and listed[root_id] == "active"
    # Each admin call is an audit row; the operator's refused one too.
    assert keyed.stop() == 0
    rows = [json.loads(line) for line in cli(keyed, "audit", "list", "--json").splitlines()]
    admin_rows = [
        (r["method"].rsplit("/", 1)[1], r["role"], r["customer_id"], r["code"])
        for r in rows
        if r["method"].startswith(ADMIN_SERVICE)
    ]
    assert admin_rows == [
        ("ListApiKeys", "operator", None, "permission_denied"),
        ("ListApiKeys", "customer", "acme", "permission_denied"),
        ("CreateApiKey", "admin", "acme", "ok"),
        ("ListApiKeys", "admin", None, "ok"),
        ("SetQuota", "admin", "acme", "ok"),
        ("GetQuota", "admin", "acme", "ok"),
        ("SetQuota", "admin", None, "invalid_argument"),
        ("RevokeApiKey", "admin", "acme", "ok"),
    ], rows


def test_a_missing_pepper_stops_start_up(
    metald_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    for pepper in (str(tmp_path / "missing"), str(empty)):
        with pytest.raises(AssertionError, match=r"exited with 2(.|\n)*PEPPER_FILE"):
            metald_factory(UNKEY_METALD_AUTH_API_KEYS="true", UNKEY_METALD_AUTH_PEPPER_FILE=pepper)


# -- JWT --------------------------------------------------------------------------------------


@pytest.fixture
def jwks_file(tmp_path: Path) -> Path:
    return tmp_path / "jwks.json"


def jwt_daemon(factory: Callable[..., Daemon], **env: str) -> Daemon:
    return factory(
        UNKEY_METALD_AUTH_JWT_ISSUER=ISSUER,
        UNKEY_METALD_AUTH_JWT_AUDIENCE=AUDIENCE,
        UNKEY_METALD_AUTH_JWT_LEEWAY_SECONDS="5",
        **env,
    )


def test_the_jwt_matrix_against_a_jwks_file(
    metald_factory: Callable[..., Daemon], jwks_file: Path, grpc_callers: list[Grpcio]
) -> None:
    rs, es, ed = SigningKey("RS256", "rs-1"), SigningKey("ES256", "es-1"), SigningKey("Ed", "ed-1")
    jwks_file.write_bytes(jwks(rs, es, ed))
    daemon = jwt_daemon(metald_factory, UNKEY_METALD_AUTH_JWKS_FILE=str(jwks_file))
    curl = CurlConnect(daemon.url, None)
    for key in (rs, es, ed):
        assert curl("ListVms", token=key.token()).ok, key.alg
    grpc = Grpcio(daemon.url, rs.token(sub="globex"))
    grpc_callers.append(grpc)
    assert grpc.must("ListVms").ok
    now = int(time.time())
    good = rs.token()
    head, body, sig = good.split(".")
    tampered_sig = sig[:-2] + ("AA" if not sig.endswith("AA") else "BB")
    bad_body = b64(
        json.dumps({"iss": ISSUER, "aud": AUDIENCE, "sub": "globex", "exp": now + 600}).encode()
    )
    refused = {
        "expired": rs.token(exp=now - 60, iat=now - 120),
        "not yet valid": rs.token(nbf=now + 300),
        "wrong audience": rs.token(aud="someone-else"),
        "wrong issuer": rs.token(iss="https://evil.test"),
        "tampered signature": f"{head}.{body}.{tampered_sig}",
        "tampered claims": f"{head}.{bad_body}.{sig}",
        "alg none": unsigned(
            {"iss": ISSUER, "aud": AUDIENCE, "sub": "acme", "exp": now + 600},
            {"alg": "none", "kid": "rs-1", "typ": "JWT"},
        ),
        "HS256 with the public key": _hs256_with(rs),
        "unknown kid": SigningKey("RS256", "rs-unknown").token(),
        "no exp": rs.token(exp=None),
        "bad customer claim": rs.token(sub="not a customer!"),
        "bad role": rs.token(role="root"),
    }
    for what, token in refused.items():
        reply = curl("ListVms", token=token)
        assert reply.code == "unauthenticated", f"{what}: {reply!r}"
    # Roles from the claim: an operator token lists across customers.
    assert curl("ListVms", {"customer_id": "globex"}, token=rs.token(role="operator")).ok
    assert curl("ListVms", {"customer_id": "globex"}, token=rs.token()).code == (
        "permission_denied"
    )
    # Rotation: a new key appears, the old one is removed; the file is re-read.
    rs2 = SigningKey("RS256", "rs-2")
    jwks_file.write_bytes(jwks(rs2, es))
    assert curl("ListVms", token=rs2.token()).ok
    assert curl("ListVms", token=rs.token()).code == "unauthenticated"


def _hs256_with(key: SigningKey) -> str:
    """The key-confusion attack: HS256 'signed' with the RSA public key's PEM as the secret
    (made by hand: PyJWT rightly refuses to do it)."""
    import hashlib
    import hmac

    now = int(time.time())
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": key.kid}).encode())
    claims = b64(
        json.dumps({"iss": ISSUER, "aud": AUDIENCE, "sub": "acme", "exp": now + 600}).encode()
    )
    mac = hmac.new(key.public_pem(), f"{header}.{claims}".encode(), hashlib.sha256).digest()
    return f"{header}.{claims}.{b64(mac)}"


class _Jwks(http.server.BaseHTTPRequestHandler):
    document = b""

    def do_GET(self) -> None:
        body = type(self).document
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def jwks_server() -> Iterator[tuple[str, type[_Jwks]]]:
    handler = type("Handler", (_Jwks,), {"document": b""})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_a_jwks_url_is_fetched_and_its_rotation_followed(
    metald_factory: Callable[..., Daemon], jwks_server: tuple[str, type[_Jwks]]
) -> None:
    url, handler = jwks_server
    old, new = SigningKey("ES256", "es-old"), SigningKey("Ed", "ed-new")
    handler.document = jwks(old)
    daemon = jwt_daemon(
        metald_factory,
        UNKEY_METALD_AUTH_JWKS_URL=url,
        UNKEY_METALD_AUTH_JWKS_REFRESH_SECONDS="1",
    )
    curl = CurlConnect(daemon.url, None)
    assert curl("ListVms", token=old.token()).ok
    assert curl("ListVms", token=new.token()).code == "unauthenticated"
    handler.document = jwks(new)
    wait_until(lambda: curl("ListVms", token=new.token()).ok, 30, "the rotated key accepted")
    wait_until(
        lambda: curl("ListVms", token=old.token()).code == "unauthenticated",
        30,
        "the removed key refused",
    )


# -- X-Tenant-ID --------------------------------------------------------------------------------


def _json_lines(daemon: Daemon) -> list[dict[str, Any]]:
    lines = daemon.log_path.read_text(errors="replace").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def test_the_tenant_header_is_accepted_and_in_the_calls_log_lines(
    metald_factory: Callable[..., Daemon], pepper: Path
) -> None:
    daemon = metald_factory(
        UNKEY_METALD_LOG_FORMAT="json",
        UNKEY_METALD_AUTH_API_KEYS="true",
        UNKEY_METALD_AUTH_PEPPER_FILE=str(pepper),
    )
    key_id, token = new_key(daemon, "--customer", "acme")
    headers = {"Content-Type": "application/json", "X-Tenant-ID": "tenant-42"}
    url = f"{daemon.url}/vmprovisioner.v1.VmService/"
    status, text = curl_raw(
        url + "CreateVm",
        json.dumps(SMALL).encode(),
        {**headers, "Authorization": f"Bearer {token}"},
    )
    assert status == 200, text
    vm_id = json.loads(text)["vmId"]
    try:
        status, _ = curl_raw(url + "ListVms", b"{}", {**headers, "Authorization": "Bearer nope"})
        assert status == 401
        lines = _json_lines(daemon)
        mine = [e for e in lines if e.get("vm_id") == vm_id and e.get("tenant") == "tenant-42"]
        assert mine and all(e.get("actor") == f"key:{key_id}" for e in mine), lines[-20:]
        refused = [e for e in lines if e.get("event") == "security"]
        assert refused and refused[-1].get("tenant") == "tenant-42"
    finally:
        CurlConnect(daemon.url, token).must("DeleteVm", {"vm_id": vm_id, "force": True})
