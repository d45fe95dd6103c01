"""TLS and mTLS on the API port (issue 10, tls), with clients nobody here wrote: curl
(Connect JSON over HTTP/1.1 and h2, gRPC-Web), grpcio's secure channel and `buf curl` in all
three protocols; plus the SDK. Certificates are made by the test (tests/tlscerts.py).

- file mode: every client works over TLS with the CA; ALPN picks h2 or http/1.1; plaintext
  to the port fails; the Prometheus listener stays plain HTTP; replacing the files serves
  the new certificate on new connections (an open one keeps working); a bad new file is
  refused and the old certificate stays.
- mTLS: no client certificate is refused in the handshake; an unknown identity is
  unauthenticated; a known one acts as its customer and sees only its VMs; a bearer token
  for another customer is refused.
- spiffe mode: only the configured trust domain and IDs are accepted.
- start-up refuses missing, mismatched and expired material (exit code 2, the variable).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from tests.tlscerts import DAY, NOW, Ca, Issued

from ._support import (
    BUF,
    METALD,
    METHODS,
    PROTO,
    ROOT,
    SERVICE,
    Daemon,
    client_env,
    free_port,
    http_get,
    wait_until,
)

Start = Callable[..., Daemon]


class Pki:
    """A CA, the daemon's certificate and clients' certificates, as files in `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = Ca()
        self.ca_file = self.ca.write(root / "ca.pem")
        self.server = self.ca.issue("metald", server=True)
        self.cert_file, self.key_file = self.server.write(root, "server")

    def client(self, name: str, **kw: Any) -> tuple[Path, Path]:
        return self.ca.issue(name, **kw).write(self.root, name)

    def context(self, client: tuple[Path, Path] | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if client is not None:
            context.load_cert_chain(str(client[0]), str(client[1]))
        return context


def replace_file(path: Path, data: bytes) -> None:
    """As an agent does: write beside it, rename over it (a new inode)."""
    tmp = path.with_suffix(".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def served_serial(port: int, context: ssl.SSLContext) -> int:
    """The serial number of the certificate a new connection is shown."""
    from cryptography import x509

    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number


def curl(
    daemon: Daemon,
    pki: Pki,
    method: str,
    body: bytes,
    *,
    content_type: str = "application/json",
    http: str = "--http1.1",
    token: str | None = "dev_customer_acme",
    client: tuple[Path, Path] | None = None,
    extra: tuple[str, ...] = (),
) -> tuple[int, str, bytes]:
    """curl --cacert: (exit code, 'http_code http_version' or stderr, body)."""
    argv = ["curl", "-sS", http, "--noproxy", "*", "--max-time", "60", "--cacert", str(pki.ca_file)]
    argv += ["-H", f"Content-Type: {content_type}", "--data-binary", "@-"]
    if token:
        argv += ["-H", f"Authorization: Bearer {token}"]
    if client is not None:
        argv += ["--cert", str(client[0]), "--key", str(client[1])]
    argv += [*extra, "-o", "-", "-w", "\n%{http_code} %{http_version}"]
    argv.append(f"https://127.0.0.1:{daemon.port}/{SERVICE}/{method}")
    out = subprocess.run(argv, input=body, capture_output=True, env=client_env(), check=False)
    if out.returncode != 0:
        return out.returncode, out.stderr.decode(errors="replace"), b""
    payload, _, tail = out.stdout.rpartition(b"\n")
    return 0, tail.decode(), payload


def connect_json(daemon: Daemon, pki: Pki, method: str, request: dict[str, Any], **kw: Any) -> Any:
    code, status, body = curl(daemon, pki, method, json.dumps(request).encode(), **kw)
    assert code == 0, status
    return status.split()[0], json.loads(body or b"{}")


def grpc_web(daemon: Daemon, pki: Pki, method: str, request: dict[str, Any], **kw: Any) -> Any:
    """curl with gRPC-Web (binary protobuf frames); (grpc-status, response message)."""
    req_type, resp_type = METHODS[method]
    message = json_format.ParseDict(request, req_type()).SerializeToString()
    frame = b"\x00" + struct.pack(">I", len(message)) + message
    code, status, body = curl(
        daemon, pki, method, frame, content_type="application/grpc-web+proto", **kw
    )
    assert code == 0, status
    assert status.startswith("200"), status
    response, grpc_status = None, None
    while body:
        flags, length = body[0], struct.unpack(">I", body[1:5])[0]
        data, body = body[5 : 5 + length], body[5 + length :]
        if flags & 0x80:  # the trailers frame
            for line in data.decode().split("\r\n"):
                name, _, value = line.partition(":")
                if name.strip().lower() == "grpc-status":
                    grpc_status = value.strip()
        else:
            response = resp_type.FromString(data)
    return grpc_status, response


def buf_curl(
    daemon: Daemon,
    pki: Pki,
    protocol: str,
    method: str,
    request: dict[str, Any],
    token: str | None = "dev_customer_acme",
    client: tuple[Path, Path] | None = None,
) -> subprocess.CompletedProcess[str]:
    argv = [str(BUF), "curl", "--schema", str(PROTO), "--protocol", protocol, "--cacert"]
    argv += [str(pki.ca_file), "--connect-timeout", "10", "-d", json.dumps(request)]
    if token:
        argv += ["-H", f"Authorization: Bearer {token}"]
    if client is not None:
        argv += ["--cert", str(client[0]), "--key", str(client[1])]
    argv.append(f"https://127.0.0.1:{daemon.port}/{SERVICE}/{method}")
    return subprocess.run(
        argv, capture_output=True, text=True, env=client_env(), cwd=ROOT, check=False
    )


def grpc_channel(daemon: Daemon, pki: Pki, client: tuple[Path, Path] | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca_file.read_bytes(),
        private_key=client[1].read_bytes() if client else None,
        certificate_chain=client[0].read_bytes() if client else None,
    )
    return grpc.secure_channel(
        f"127.0.0.1:{daemon.port}", credentials, options=[("grpc.enable_http_proxy", 0)]
    )


def grpc_call(
    channel: grpc.Channel, method: str, request: dict[str, Any], token: str | None = None
) -> Any:
    req_type, resp_type = METHODS[method]
    stub = channel.unary_unary(
        f"/{SERVICE}/{method}",
        request_serializer=req_type.SerializeToString,
        response_deserializer=resp_type.FromString,
    )
    metadata = [("authorization", f"Bearer {token}")] if token else []
    return stub(json_format.ParseDict(request, req_type()), metadata=metadata, timeout=60)


def tls_env(pki: Pki, **more: str) -> dict[str, str]:
    return {
        "UNKEY_METALD_TLS_MODE": "file",
        "UNKEY_METALD_TLS_CERT_FILE": str(pki.cert_file),
        "UNKEY_METALD_TLS_KEY_FILE": str(pki.key_file),
        "UNKEY_METALD_TLS_RELOAD_SECONDS": "0.5",
        **more,
    }


# -- file mode ---------------------------------------------------------------------------------


def test_every_client_over_tls_and_reload(metald_factory: Start, tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    daemon = metald_factory(client_tls=pki.context(), **tls_env(pki))
    # A client that connects and never starts the handshake (checked at the end).
    silent = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)

    # curl, Connect JSON, over HTTP/1.1 and over h2 (ALPN).
    for flag, version in (("--http1.1", "1.1"), ("--http2", "2")):
        code, status, body = curl(daemon, pki, "ListVms", b"{}", http=flag)
        assert code == 0, status
        assert status == f"200 {version}", status
        assert "vms" in json.loads(body) or json.loads(body) == {}
    # curl, gRPC-Web (HTTP/1.1 and h2).
    for flag in ("--http1.1", "--http2"):
        grpc_status, response = grpc_web(daemon, pki, "ListVms", {}, http=flag)
        assert grpc_status == "0" and response is not None
    # A refusal arrives over TLS too.
    status, answer = connect_json(daemon, pki, "ListVms", {}, token="nope")
    assert status == "401" and answer["code"] == "unauthenticated", answer

    # grpcio's secure channel (h2 by ALPN).
    channel = grpc_channel(daemon, pki)
    try:
        grpc_call(channel, "ListVms", {}, token="dev_customer_acme")
        with pytest.raises(grpc.RpcError) as refused:
            grpc_call(channel, "ListVms", {}, token="nope")
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED

        # buf curl --cacert in every protocol (gRPC needs h2: ALPN gives it).
        for protocol in ("connect", "grpc", "grpcweb"):
            out = buf_curl(daemon, pki, protocol, "ListVms", {})
            assert out.returncode == 0, f"{protocol}: {out.stderr}"

        # Plaintext to the TLS port gets no answer; the Prometheus listener stays plain.
        with pytest.raises(OSError):
            http_get(f"http://127.0.0.1:{daemon.port}/health", timeout=10)
        out = subprocess.run(
            ["curl", "-sS", "--noproxy", "*", "--max-time", "10",
             f"http://127.0.0.1:{daemon.port}/health"],
            capture_output=True, env=client_env(), check=False,
        )  # fmt: skip
        assert out.returncode != 0, out.stdout
        status_code, metrics = http_get(daemon.metrics_url)
        assert status_code == 200 and b"metald_auth_refusals_total" in metrics
        status_code, metrics = http_get(daemon.url + "/metrics", context=pki.context())
        assert status_code == 200 and b"metald_auth_refusals_total" in metrics

        # Reload: a new certificate (new serial) replaces the files; new connections see it.
        old = pki.server.serial
        assert served_serial(daemon.port, pki.context()) == old
        fresh = pki.ca.issue("metald", server=True)
        replace_file(pki.key_file, fresh.key_pem)
        replace_file(pki.cert_file, fresh.cert_pem)
        wait_until(
            lambda: served_serial(daemon.port, pki.context()) == fresh.serial,
            30,
            "new connections to be shown the new certificate",
        )
        # The connection opened before keeps working.
        grpc_call(channel, "ListVms", {}, token="dev_customer_acme")

        # A bad new file (a key that is not the certificate's) is refused: the old stays.
        wrong: Issued = pki.ca.issue("metald", server=True)
        replace_file(pki.cert_file, wrong.cert_pem)
        wait_until(
            lambda: "TLS reload FAILED" in daemon.log_path.read_text(errors="replace"),
            30,
            "the daemon to log the refused reload",
        )
        assert served_serial(daemon.port, pki.context()) == fresh.serial
        code, status, _ = curl(daemon, pki, "ListVms", b"{}")
        assert code == 0 and status.startswith("200"), status
        # SIGHUP reloads at once (the poll would too): put the right certificate back.
        replace_file(pki.cert_file, fresh.cert_pem)
        os.kill(daemon.pid, 1)
        wait_until(
            lambda: daemon.log_path.read_text(errors="replace").count("TLS material reloaded") >= 2,
            30,
            "the good certificate to be loaded again",
        )
        # The silent client was closed by the server: the handshake has a deadline (10 s here;
        # the test shows that there is one, not its length).
        silent.settimeout(120)
        assert silent.recv(1) == b""
    finally:
        channel.close()
        silent.close()


# -- mTLS ----------------------------------------------------------------------------------------

ACME_ID = "spiffe://example.org/tenant/acme"


def _identities(path: Path) -> Path:
    path.write_text(
        "# customer role identity\n"
        f"acme customer {ACME_ID}\n"
        "globex customer O=Globex,CN=globex-ci\n"  # RFC 4514: last RDN first
    )
    return path


def test_mtls_identities(metald_factory: Start, tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    acme = pki.client("acme", uris=(ACME_ID,))
    globex = pki.client("globex-ci", organization="Globex")
    stranger = pki.client("stranger")
    env = tls_env(
        pki,
        UNKEY_METALD_TLS_CA_FILE=str(pki.ca_file),
        UNKEY_METALD_TLS_IDENTITIES_FILE=str(_identities(tmp_path / "identities")),
    )
    daemon = metald_factory(client_tls=pki.context(acme), **env)

    # No client certificate: refused in the handshake (no HTTP answer at all).
    code, err, _ = curl(daemon, pki, "ListVms", b"{}", token=None)
    assert code != 0, err
    print("curl without a client certificate:", code, err)
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as raw:
        try:
            tls = pki.context().wrap_socket(raw, server_hostname="127.0.0.1")
            tls.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            # TLS 1.3: the client's side of the handshake ends before the server checks
            # its certificate; the server then ends the connection without an answer.
            answer = tls.recv(100)
        except (ssl.SSLError, ConnectionError):
            answer = b""
    assert answer == b"", answer
    out = buf_curl(daemon, pki, "grpc", "ListVms", {}, token=None)
    assert out.returncode != 0

    # A certificate of the CA whose identity is not listed: unauthenticated.
    status, answer = connect_json(daemon, pki, "ListVms", {}, token=None, client=stranger)
    assert status == "401" and answer["code"] == "unauthenticated", answer
    assert "CN=stranger" in answer["message"]

    # Known identities act as their customers (no token needed), and see only their VMs.
    status, created = connect_json(
        daemon, pki, "CreateVm", {"config": {"cpu": {"vcpu_count": 1},
        "memory": {"size_bytes": 128 << 20}}}, token=None, client=acme,
    )  # fmt: skip
    assert status == "200", created
    vm_id = created["vmId"]
    try:
        _, mine = connect_json(daemon, pki, "ListVms", {}, token=None, client=acme)
        assert [vm["vmId"] for vm in mine.get("vms", [])] == [vm_id]
        _, theirs = connect_json(daemon, pki, "ListVms", {}, token=None, client=globex)
        assert theirs.get("vms", []) == []
        status, answer = connect_json(
            daemon, pki, "GetVmInfo", {"vm_id": vm_id}, token=None, client=globex
        )
        assert answer["code"] == "not_found", answer
        # gRPC and gRPC-Web with the client certificate.
        channel = grpc_channel(daemon, pki, acme)
        try:
            listed = grpc_call(channel, "ListVms", {})
            assert [vm.vm_id for vm in listed.vms] == [vm_id]
        finally:
            channel.close()
        grpc_status, response = grpc_web(daemon, pki, "ListVms", {}, token=None, client=globex)
        assert grpc_status == "0" and list(response.vms) == []
        for protocol in ("connect", "grpc", "grpcweb"):
            out = buf_curl(daemon, pki, protocol, "ListVms", {}, token=None, client=acme)
            assert out.returncode == 0 and vm_id in out.stdout, f"{protocol}: {out.stderr}"

        # A token as well: the same customer is fine; another customer is refused.
        status, _ = connect_json(daemon, pki, "ListVms", {}, token="dev_customer_acme", client=acme)
        assert status == "200"
        status, answer = connect_json(
            daemon, pki, "GetVmInfo", {"vm_id": vm_id}, token="dev_customer_globex", client=acme
        )
        assert answer["code"] == "unauthenticated", answer

        # The SDK with CA, client certificate and key.
        from metald.client import AsyncMetaldClient, MetaldClient

        with MetaldClient(
            daemon.url, None, ca_file=pki.ca_file, cert_file=acme[0], key_file=acme[1]
        ) as sdk:
            assert [vm.vm_id for vm in sdk.list_vms().vms] == [vm_id]

        async def async_list() -> list[str]:
            async with AsyncMetaldClient(
                daemon.url, "dev_customer_globex", ca_file=pki.ca_file, cert_file=globex[0],
                key_file=globex[1],
            ) as client:  # fmt: skip
                return [vm.vm_id for vm in (await client.list_vms()).vms]

        assert asyncio.run(async_list()) == []
        # The CLI: TLS options of the `vm` group, from flags and from the environment.
        argv = [str(METALD), "vm", "--ca-file", str(pki.ca_file), "--cert", str(acme[0])]
        argv += ["--key", str(acme[1]), "list", "--addr", daemon.url, "--quiet"]
        out = subprocess.run(argv, capture_output=True, text=True, env=client_env(), check=False)
        assert out.returncode == 0 and out.stdout.split() == [vm_id], out.stderr
        env = {**client_env(), "METALD_CA_FILE": str(pki.ca_file), "METALD_CERT_FILE":
               str(globex[0]), "METALD_KEY_FILE": str(globex[1])}  # fmt: skip
        argv = [str(METALD), "vm", "list", "--addr", daemon.url, "--quiet"]
        out = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        assert out.returncode == 0 and out.stdout.split() == [], out.stderr
        # Without the CA the server's certificate is not trusted: a clear error, exit 1.
        argv = [str(METALD), "vm", "--cert", str(acme[0]), "--key", str(acme[1]), "list"]
        out = subprocess.run(
            [*argv, "--addr", daemon.url], capture_output=True, text=True, env=client_env(),
            check=False,
        )  # fmt: skip
        assert out.returncode != 0 and "error:" in out.stderr, (out.stdout, out.stderr)
    finally:
        connect_json(
            daemon, pki, "DeleteVm", {"vm_id": vm_id, "force": True}, token=None, client=acme
        )
    log = daemon.log_path.read_text(errors="replace")
    assert "unknown client certificate identity" in log  # the security event

    # The identities file is re-read when it changes: the stranger becomes an operator of
    # no customer (it then lists every customer's VMs), and globex, removed, is refused.
    path = tmp_path / "identities"
    fresh = tmp_path / "identities.new"
    fresh.write_text(f"acme customer {ACME_ID}\n- operator CN=stranger\n")
    fresh.rename(path)

    def stranger_lists() -> bool:
        status, _ = connect_json(daemon, pki, "ListVms", {}, token=None, client=stranger)
        return status == "200"

    wait_until(stranger_lists, 30, "the new identities file in use")
    status, answer = connect_json(daemon, pki, "ListVms", {}, token=None, client=globex)
    assert status == "401" and "O=Globex,CN=globex-ci" in answer["message"], answer


# -- spiffe mode --------------------------------------------------------------------------------


def test_spiffe_mode(metald_factory: Start, tmp_path: Path) -> None:
    ca = Ca("example.org bundle")
    svid_dir = tmp_path / "svid"
    svid_dir.mkdir()
    server = ca.issue("metald", server=True, uris=("spiffe://example.org/metald",))
    (svid_dir / "svid.pem").write_bytes(server.cert_pem)
    (svid_dir / "svid_key.pem").write_bytes(server.key_pem)
    (svid_dir / "svid_bundle.pem").write_bytes(ca.pem)
    pki = Pki.__new__(Pki)
    pki.root, pki.ca, pki.ca_file = tmp_path, ca, svid_dir / "svid_bundle.pem"
    acme = ca.issue("acme", uris=(ACME_ID,)).write(tmp_path, "acme")
    other_id = ca.issue("b", uris=("spiffe://example.org/tenant/b",)).write(tmp_path, "b")
    evil = ca.issue("evil", uris=("spiffe://evil.org/tenant/acme",)).write(tmp_path, "evil")
    plain = ca.issue("plain").write(tmp_path, "plain")
    identities = tmp_path / "identities"
    identities.write_text(
        f"acme customer {ACME_ID}\nbee customer spiffe://example.org/tenant/b\n"
        "evil customer spiffe://evil.org/tenant/acme\nplain customer CN=plain\n"
    )
    daemon = metald_factory(
        client_tls=pki.context(acme),
        UNKEY_METALD_TLS_MODE="spiffe",
        UNKEY_METALD_TLS_SPIFFE_DIR=str(svid_dir),
        UNKEY_METALD_TLS_SPIFFE_TRUST_DOMAINS="example.org",
        UNKEY_METALD_TLS_SPIFFE_ALLOWED_IDS=ACME_ID,
        UNKEY_METALD_TLS_IDENTITIES_FILE=str(identities),
        UNKEY_METALD_TLS_RELOAD_SECONDS="0.5",
    )
    status, _ = connect_json(daemon, pki, "ListVms", {}, token=None, client=acme)
    assert status == "200"
    for refused, why in ((other_id, "is not accepted"), (evil, "trust domain"),
                         (plain, "no SPIFFE ID")):  # fmt: skip
        status, answer = connect_json(daemon, pki, "ListVms", {}, token=None, client=refused)
        assert answer["code"] == "unauthenticated" and why in answer["message"], answer
    # The agent rotates the SVID: new connections see it.
    rotated = ca.issue("metald", server=True, uris=("spiffe://example.org/metald",))
    replace_file(svid_dir / "svid_key.pem", rotated.key_pem)
    replace_file(svid_dir / "svid.pem", rotated.cert_pem)
    wait_until(
        lambda: served_serial(daemon.port, pki.context(acme)) == rotated.serial,
        30,
        "the rotated SVID to be served",
    )


# -- start-up refusals -------------------------------------------------------------------------


def _serve(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {
        **client_env(),
        "UNKEY_METALD_ADDRESS": "127.0.0.1",
        "UNKEY_METALD_PORT": str(free_port()),
        "UNKEY_METALD_OTEL_PROMETHEUS_ENABLED": "false",
        "UNKEY_METALD_DATA_DIR": str(tmp_path / "data"),
        "UNKEY_METALD_BILLING_ENABLED": "false",
        **env,
    }
    return subprocess.run(
        [str(METALD), "serve"], env=full, capture_output=True, text=True, timeout=120, check=False
    )


def test_startup_refuses_bad_material(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    other = pki.ca.issue("other", server=True)
    expired = pki.ca.issue("old", server=True, not_before=NOW - 3 * DAY, not_after=NOW - DAY)
    expired_cert, expired_key = expired.write(tmp_path, "expired")
    cases = [
        (tls_env(pki, UNKEY_METALD_TLS_CERT_FILE=str(tmp_path / "missing.pem")),
         "UNKEY_METALD_TLS_CERT_FILE", "no such file"),
        (tls_env(pki, UNKEY_METALD_TLS_KEY_FILE=str(other.write(tmp_path, "other")[1])),
         "UNKEY_METALD_TLS_KEY_FILE", "does not belong"),
        (tls_env(pki, UNKEY_METALD_TLS_CERT_FILE=str(expired_cert),
                 UNKEY_METALD_TLS_KEY_FILE=str(expired_key)),
         "UNKEY_METALD_TLS_CERT_FILE", "expired"),
        (tls_env(pki, UNKEY_METALD_TLS_CA_FILE=str(pki.ca_file)),
         "UNKEY_METALD_TLS_IDENTITIES_FILE", "customer"),
        ({"UNKEY_METALD_TLS_CERT_FILE": str(pki.cert_file)}, "UNKEY_METALD_TLS_MODE=disabled",
         "plaintext"),
    ]  # fmt: skip
    for env, variable, words in cases:
        out = _serve(tmp_path, **env)
        assert out.returncode == 2, (env, out.stderr[-2000:])
        assert variable in out.stderr and words in out.stderr, out.stderr[-2000:]
        assert "metald serving" not in out.stderr
