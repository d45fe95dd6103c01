"""TLS on the API port: the server's certificate, key and client CA, checked at start-up and
re-read when their files change.

Why so strict at start-up: a daemon that was told to speak TLS and quietly served plaintext
(or an expired certificate that every client then refuses) is worse than one that does not
start. So every configured file must exist, be readable and parse; the key must be the
certificate's; the certificate must be valid now. The error names the environment variable.

Why reload this way: certificates from an ACME client or a SPIFFE agent are replaced on disk
every few hours. The files' identities (inode, size, mtime) are polled (and SIGHUP asks for
a check at once); changed files are loaded into a *new* SSLContext, and only when that
succeeds does it become current. The server's listening context never changes: its SNI
callback (called for every handshake, with or without a server name) hands the handshake
the current context, so new connections get the new material and open ones keep theirs.
A bad new file is logged as an error and the old material stays in use.

TLS 1.2 is the minimum; ALPN offers h2 and http/1.1, so Connect (both), gRPC (h2) and
gRPC-Web share the one port. Session tickets are off: a resumed session would skip the
client-certificate check against a CA that may have been rotated since. (TLS 1.2 session-ID
resumption from OpenSSL's server-side cache stays possible for its 300 s: Python's ssl has
no call to turn that cache off.)
"""

from __future__ import annotations

import datetime
import logging
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

log = logging.getLogger("metald.tls")

ALPN = ["h2", "http/1.1"]


class TlsError(Exception):
    """Configured TLS material that cannot be used; the message names the variable."""


@dataclass(frozen=True)
class TlsFile:
    """A configured file and the environment variable that named it (for messages)."""

    path: Path
    variable: str

    def named(self) -> str:
        return f"{self.variable}={self.path}"


@dataclass(frozen=True)
class TlsFiles:
    cert: TlsFile  # the server's certificate chain (leaf first), PEM
    key: TlsFile  # its private key, PEM
    ca: TlsFile | None = None  # client CAs (trust bundle): with it, client certs are required

    @property
    def all(self) -> list[TlsFile]:
        return [self.cert, self.key] + ([self.ca] if self.ca is not None else [])


@dataclass(frozen=True)
class Material:
    """What was loaded: the context and the server certificate's facts (logged)."""

    context: ssl.SSLContext
    serial: int
    subject: str
    not_after: datetime.datetime


def _read(file: TlsFile) -> bytes:
    try:
        return file.path.read_bytes()
    except FileNotFoundError:
        raise TlsError(f"{file.named()}: no such file") from None
    except OSError as exc:
        raise TlsError(f"{file.named()}: cannot read it ({exc.strerror or exc})") from None


def _certificates(file: TlsFile, data: bytes) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise TlsError(f"{file.named()}: holds no PEM certificate")
    return certs


def _check_validity(file: TlsFile, cert: x509.Certificate, now: datetime.datetime) -> None:
    if cert.not_valid_after_utc <= now:
        raise TlsError(
            f"{file.named()}: the certificate (serial {cert.serial_number:x}) expired at "
            f"{cert.not_valid_after_utc.isoformat()}"
        )
    if cert.not_valid_before_utc > now:
        raise TlsError(
            f"{file.named()}: the certificate (serial {cert.serial_number:x}) is not valid "
            f"before {cert.not_valid_before_utc.isoformat()}"
        )


def load(files: TlsFiles, now: datetime.datetime | None = None) -> Material:
    """A server context from `files`, or TlsError naming the variable of the bad file."""
    now = now or datetime.datetime.now(datetime.UTC)
    chain = _certificates(files.cert, _read(files.cert))
    _check_validity(files.cert, chain[0], now)
    _read(files.key)  # missing/unreadable named before OpenSSL's less helpful errors
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_TICKET
    context.num_tickets = 0
    context.set_alpn_protocols(ALPN)
    try:
        # A password callback, so an encrypted key fails here instead of OpenSSL asking on
        # the terminal (there is none under systemd): metald takes unencrypted keys only.
        context.load_cert_chain(str(files.cert.path), str(files.key.path), password=_no_password)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise TlsError(
                f"{files.key.named()}: the key does not belong to the certificate of "
                f"{files.cert.named()}"
            ) from None
        raise TlsError(
            f"{files.key.named()}: cannot load the key ({exc.reason}; it must be PEM and not "
            "encrypted)"
        ) from None
    if files.ca is not None:
        data = _read(files.ca)
        for ca in _certificates(files.ca, data):
            _check_validity(files.ca, ca, now)
        try:
            context.load_verify_locations(cadata=data.decode("ascii", "replace"))
        except ssl.SSLError as exc:
            raise TlsError(f"{files.ca.named()}: cannot load it ({exc.reason})") from None
        context.verify_mode = ssl.CERT_REQUIRED
    leaf = chain[0]
    return Material(
        context, leaf.serial_number, leaf.subject.rfc4514_string(), leaf.not_valid_after_utc
    )


def _no_password() -> bytes:
    return b""


Signature = tuple[tuple[int, int, int, int] | None, ...]


def _signature(files: TlsFiles) -> Signature:
    """The files' identities: a rename (an agent's atomic replace) or a write changes it."""
    out: list[tuple[int, int, int, int] | None] = []
    for file in files.all:
        try:
            st = os.stat(file.path)
        except OSError:
            out.append(None)
        else:
            out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


class ReloadingTls:
    """The server's SSLContext and the material behind it, swapped when the files change.

    `server_context` is what the listener gets; every handshake is handed `current` by its
    SNI callback. `check()` reloads if the files changed since the last attempt (tls_setup's
    TlsSetup.run calls it every UNKEY_METALD_TLS_RELOAD_SECONDS).
    """

    def __init__(self, files: TlsFiles, on_reload: Callable[[Material], None] | None = None):
        self.files = files
        self._on_reload = on_reload
        self.current = load(files)  # TlsError at start-up: the daemon does not start
        self._signature = _signature(files)
        self.reloads = 0
        self.failures = 0
        self.server_context = load(files).context
        self.server_context.sni_callback = self._pick

    @property
    def mutual(self) -> bool:
        """Whether client certificates are required (a CA file is configured)."""
        return self.files.ca is not None

    def _pick(self, sock: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        context = self.current.context
        if sock.context is not context:
            sock.context = context
        return None

    def check(self, force: bool = False) -> bool:
        """Reload when the files changed (or `force`); whether new material is in use."""
        signature = _signature(self.files)
        if signature == self._signature and not force:
            return False
        self._signature = signature
        try:
            material = load(self.files)
        except TlsError as exc:
            self.failures += 1
            log.error(
                "TLS reload FAILED, still serving the previous certificate (serial %x, "
                "expires %s): %s",
                self.current.serial,
                self.current.not_after.isoformat(),
                exc,
                extra={"event": "tls_reload_failed"},
            )
            return False
        self.current = material
        self.reloads += 1
        log.info(
            "TLS material reloaded: certificate %s serial %x, expires %s",
            material.subject,
            material.serial,
            material.not_after.isoformat(),
            extra={"event": "tls_reloaded"},
        )
        if self._on_reload is not None:
            self._on_reload(material)
        return True
