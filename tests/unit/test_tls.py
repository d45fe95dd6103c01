"""api/tls.py: TLS material checked at start-up and reloaded, shown to real handshakes.

The handshakes run through memory BIOs (ssl.MemoryBIO: OpenSSL on both sides, no socket),
so they show what a client connecting to the listener's context would be given: which
certificate, whether its own certificate is required and checked against which CA.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from metald.api import hypercorn_tls
from metald.api.tls import ReloadingTls, TlsError, TlsFile, TlsFiles, load
from tests.tlscerts import DAY, NOW, Ca, Issued


def files_for(root: Path, ca: Ca, server: Issued, mutual: bool = False) -> TlsFiles:
    cert, key = server.write(root, "server")
    ca_file = TlsFile(ca.write(root / "ca.pem"), "UNKEY_METALD_TLS_CA_FILE") if mutual else None
    return TlsFiles(
        TlsFile(cert, "UNKEY_METALD_TLS_CERT_FILE"),
        TlsFile(key, "UNKEY_METALD_TLS_KEY_FILE"),
        ca_file,
    )


def client_context(
    ca: Ca, client: Issued | None = None, root: Path | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca.pem.decode())
    if client is not None:
        assert root is not None
        cert, key = client.write(root, f"client-{client.serial:x}")
        context.load_cert_chain(str(cert), str(key))
    return context


def handshake(server_context: ssl.SSLContext, client: ssl.SSLContext) -> ssl.SSLObject:
    """A full handshake (and one exchange, so TLS 1.3's client certificate is checked);
    the server's SSLObject. SSLError when either side refuses."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    s = server_context.wrap_bio(s_in, s_out, server_side=True)
    c_done = s_done = False
    for _ in range(20):
        if not c_done:
            try:
                c.do_handshake()
                c_done = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        if not s_done:
            try:
                s.do_handshake()
                s_done = True
            except ssl.SSLWantReadError:
                pass
        c_in.write(s_out.read())
        if c_done and s_done:
            c.write(b"ping")
            s_in.write(c_out.read())
            assert s.read(4) == b"ping"
            return s
    raise AssertionError("the handshake did not finish")


def client_view(server_context: ssl.SSLContext, client: ssl.SSLContext) -> int:
    """The serial of the certificate a new client is shown."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    s = server_context.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(20):
        try:
            c.do_handshake()
            break
        except ssl.SSLWantReadError:
            pass
        s_in.write(c_out.read())
        with contextlib.suppress(ssl.SSLWantReadError):
            s.do_handshake()
        c_in.write(s_out.read())
    der = c.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def replace(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# -- start-up checks ---------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_loads_good_material_with_alpn_and_tls12_minimum(tmp_path: Path) -> None:
    ca = Ca()
    server = ca.issue("metald", server=True)
    material = load(files_for(tmp_path, ca, server))
    assert material.serial == server.serial
    assert material.context.minimum_version is ssl.TLSVersion.TLSv1_2
    assert material.context.verify_mode is ssl.CERT_NONE
    client = client_context(ca)
    client.set_alpn_protocols(["h2"])
    assert handshake(material.context, client).selected_alpn_protocol() == "h2"
    old = client_context(ca)
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(ssl.SSLError):
        handshake(material.context, old)


def test_missing_files_name_their_variable(tmp_path: Path) -> None:
    ca = Ca()
    files = files_for(tmp_path, ca, ca.issue("metald", server=True))
    files.key.path.unlink()
    with pytest.raises(TlsError, match=r"UNKEY_METALD_TLS_KEY_FILE=.*no such file"):
        load(files)
    files.cert.path.unlink()
    with pytest.raises(TlsError, match=r"UNKEY_METALD_TLS_CERT_FILE=.*no such file"):
        load(files)


def test_a_key_of_another_certificate_is_refused(tmp_path: Path) -> None:
    ca = Ca()
    files = files_for(tmp_path, ca, ca.issue("metald", server=True))
    files.key.path.write_bytes(ca.issue("other", server=True).key_pem)
    with pytest.raises(TlsError, match=r"UNKEY_METALD_TLS_KEY_FILE=.*does not belong"):
        load(files)


def test_expired_and_future_certificates_are_refused(tmp_path: Path) -> None:
    ca = Ca()
    expired = ca.issue("old", server=True, not_before=NOW - 3 * DAY, not_after=NOW - DAY)
    with pytest.raises(TlsError, match=r"UNKEY_METALD_TLS_CERT_FILE=.*expired"):
        load(files_for(tmp_path, ca, expired))
    future = ca.issue("new", server=True, not_before=NOW + DAY)
    with pytest.raises(TlsError, match=r"not valid before"):
        load(files_for(tmp_path, ca, future))


def test_garbage_is_refused(tmp_path: Path) -> None:
    ca = Ca()
    files = files_for(tmp_path, ca, ca.issue("metald", server=True), mutual=True)
    assert files.ca is not None
    files.ca.path.write_text("not a certificate\n")
    with pytest.raises(TlsError, match=r"UNKEY_METALD_TLS_CA_FILE=.*no PEM certificate"):
        load(files)
    files.cert.path.write_text("")
    with pytest.raises(TlsError, match=r"UNKEY_METALD_TLS_CERT_FILE=.*no PEM certificate"):
        load(files)


# -- mTLS in the handshake ---------------------------------------------------------------------


def test_client_certificates_are_required_with_a_ca(tmp_path: Path) -> None:
    ca = Ca()
    tls = ReloadingTls(files_for(tmp_path, ca, ca.issue("metald", server=True), mutual=True))
    assert tls.mutual
    with pytest.raises(ssl.SSLError, match=r"(?i)certificate"):
        handshake(tls.server_context, client_context(ca))
    other_ca = Ca("someone else")
    stranger = other_ca.issue("stranger")
    with pytest.raises(ssl.SSLError):
        handshake(tls.server_context, client_context(ca, stranger, tmp_path))
    good = ca.issue("acme", uris=("spiffe://example.org/acme",))
    server = handshake(tls.server_context, client_context(ca, good, tmp_path))
    # What hypercorn_tls puts in the ASGI scope for that connection.
    fields = hypercorn_tls.connection_tls(server)
    der = good.cert.public_bytes(serialization.Encoding.DER)
    assert fields["client_cert_chain"] == [ssl.DER_cert_to_PEM_cert(der)]
    assert fields["client_cert_name"] == "CN=acme"
    assert fields["tls_version"] in (0x0303, 0x0304)


# -- reload --------------------------------------------------------------------------------------


def test_reload_serves_new_material_to_new_handshakes(tmp_path: Path) -> None:
    ca = Ca()
    first = ca.issue("metald", server=True)
    tls = ReloadingTls(files_for(tmp_path, ca, first))
    assert client_view(tls.server_context, client_context(ca)) == first.serial
    assert not tls.check()  # nothing changed
    second = ca.issue("metald", server=True)
    replace(tls.files.key.path, second.key_pem)
    replace(tls.files.cert.path, second.cert_pem)
    assert tls.check()
    assert tls.current.serial == second.serial
    assert client_view(tls.server_context, client_context(ca)) == second.serial


def test_a_bad_new_file_keeps_the_old_material(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = Ca()
    first = ca.issue("metald", server=True)
    tls = ReloadingTls(files_for(tmp_path, ca, first))
    replace(tls.files.cert.path, ca.issue("other", server=True).cert_pem)  # key mismatch
    assert not tls.check()
    assert tls.failures == 1 and tls.current.serial == first.serial
    assert "TLS reload FAILED" in caplog.text
    assert client_view(tls.server_context, client_context(ca)) == first.serial
    assert not tls.check() and tls.failures == 1  # the same bad files: not retried
    replace(tls.files.cert.path, b"garbage")
    assert not tls.check() and tls.failures == 2
    assert client_view(tls.server_context, client_context(ca)) == first.serial


def test_a_rotated_ca_is_what_client_certificates_are_checked_against(tmp_path: Path) -> None:
    old_ca, new_ca = Ca("old"), Ca("new")
    server = new_ca.issue("metald", server=True)
    files = files_for(tmp_path, new_ca, server, mutual=True)
    assert files.ca is not None
    files.ca.path.write_bytes(old_ca.pem)
    tls = ReloadingTls(files)
    old_client, new_client = old_ca.issue("a"), new_ca.issue("b")
    trust_server = client_context(new_ca)
    trust_server.load_cert_chain(*map(str, old_client.write(tmp_path, "old-client")))
    handshake(tls.server_context, trust_server)  # the old CA is trusted now
    replace(files.ca.path, new_ca.pem)
    assert tls.check()
    with pytest.raises(ssl.SSLError):
        handshake(tls.server_context, trust_server)
    trust_new = client_context(new_ca)
    trust_new.load_cert_chain(*map(str, new_client.write(tmp_path, "new-client")))
    handshake(tls.server_context, trust_new)


def test_an_encrypted_key_is_refused_not_prompted_for(tmp_path: Path) -> None:
    ca = Ca()
    server = ca.issue("metald", server=True)
    files = files_for(tmp_path, ca, server)
    files.key.path.write_bytes(
        server.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(TlsError, match=r"UNKEY_METALD_TLS_KEY_FILE=.*not encrypted"):
        load(files)
