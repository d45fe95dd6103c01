"""The one port speaks every protocol and framing the contract promises, as seen on the wire by
the clients themselves (`buf curl -v`, curl's own report of the HTTP version)."""

from __future__ import annotations

import subprocess

import pytest

from metald.gen.vmprovisioner.v1 import vm_pb2 as pb

from ._support import BUF, PROTO, ROOT, SERVICE, Daemon, client_env

AUTH = "Authorization: Bearer dev_customer_wire"


@pytest.mark.parametrize(
    ("protocol", "content_type"),
    [
        ("connect", "application/proto"),
        ("grpc", "application/grpc"),
        ("grpcweb", "application/grpc-web"),
    ],
)
def test_buf_curl_protocols_on_h2c(daemon: Daemon, protocol: str, content_type: str) -> None:
    out = subprocess.run(
        [
            str(BUF), "curl", "-v", "--schema", str(PROTO), "--http2-prior-knowledge",
            "--protocol", protocol, "-H", AUTH, "-d", "{}",
            f"{daemon.url}/{SERVICE}/ListVms",
        ],
        capture_output=True, text=True, timeout=60, env=client_env(), cwd=ROOT, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    log = out.stderr
    assert f"> (#1) Content-Type: {content_type}" in log, log
    assert "< (#1) HTTP/2.0 200" in log, log
    assert f"< (#1) Content-Type: {content_type}" in log, log
    if protocol == "grpc":
        assert "Grpc-Status: 0" in log, log


def _curl(daemon: Daemon, *args: str, data: bytes) -> tuple[str, str, bytes]:
    """(http version, status, body) of one POST to ListVms."""
    out = subprocess.run(
        [
            "curl", "-sS", "--noproxy", "*", "--max-time", "30", *args, "-H", AUTH,
            "--data-binary", "@-", "-o", "-", "-w", "\n%{http_version} %{http_code}",
            f"{daemon.url}/{SERVICE}/ListVms",
        ],
        input=data, capture_output=True, timeout=60, env=client_env(), check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    body, _, tail = out.stdout.rpartition(b"\n")
    version, status = tail.decode().split()
    return version, status, body


@pytest.mark.parametrize("http", ["--http1.1", "--http2-prior-knowledge"])
def test_connect_json_and_binary_over_http1_and_h2c(daemon: Daemon, http: str) -> None:
    expected_version = "1.1" if http == "--http1.1" else "2"
    version, status, body = _curl(
        daemon, http, "-H", "Content-Type: application/json", data=b'{"page_size": 5}'
    )
    assert (version, status) == (expected_version, "200"), body
    assert body.strip().startswith(b"{"), body

    request = pb.ListVmsRequest(page_size=5).SerializeToString()
    version, status, body = _curl(
        daemon, http, "-H", "Content-Type: application/proto", data=request
    )
    assert (version, status) == (expected_version, "200"), body
    reply = pb.ListVmsResponse.FromString(body)
    assert list(reply.vms) == [] and reply.total_count == 0
