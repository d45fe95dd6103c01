"""Who a client certificate is: its identity, the customer and role configuration maps it to,
and (spiffe mode) whether its trust domain and ID are accepted.

The handshake already proved the certificate chains to a configured CA (api/tls.py; a
connection without one never gets here). What the certificate *names* is decided here, per
call, by the auth interceptor: a SPIFFE ID (the `spiffe://` URI SAN) if it has one, else its
subject as an RFC 4514 string. An identity the identities file does not list is refused as
unauthenticated (a security event), so a certificate from the right CA is not enough: it
must be one this host was told about.

The identities file (UNKEY_METALD_TLS_IDENTITIES_FILE), one entry per line (a line that starts
with `#` is a comment):

    <customer_id> <role> <identity>

role is customer, operator or admin; the identity is the rest of the line (subjects hold
spaces and commas). An operator or admin may name no customer (`-`), e.g.

    acme     customer spiffe://example.org/tenant/acme
    globex   customer O=Globex,CN=globex-ci
    -        operator spiffe://example.org/ops/console

The peer certificate reaches the app in the ASGI TLS extension (scope["extensions"]["tls"],
api/hypercorn_tls.py fills it for hypercorn); api/http.py puts the leaf's PEM in
`current_peer` for the call, where the auth interceptor reads it.
"""

from __future__ import annotations

import functools
import logging
import os
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509

from metald.api.auth import TokenAuthenticator, TokenRefused
from metald.core.identity import Caller, Role
from metald.core.validation import CUSTOMER_ID

log = logging.getLogger("metald.tls")

# The PEM of the calling connection's client certificate (None: none was presented).
current_peer: ContextVar[str | None] = ContextVar("current_peer", default=None)


def peer_from_scope(scope: dict[str, Any]) -> str | None:
    """The leaf client certificate (PEM) of an ASGI scope's TLS extension, if any."""
    tls = scope.get("extensions", {}).get("tls")
    if not tls:
        return None
    chain = tls.get("client_cert_chain") or ()
    return str(chain[0]) if chain else None


@dataclass(frozen=True)
class PeerIdentity:
    id: str  # the SPIFFE ID, or the subject (RFC 4514)
    spiffe_id: str | None  # set when the certificate carries one spiffe:// URI SAN
    problem: str | None = None  # why it is no usable identity (e.g. two SPIFFE IDs)


@functools.lru_cache(maxsize=1024)
def identity_of(pem: str) -> PeerIdentity:
    """A certificate's identity (cached: one parse per certificate, not per call)."""
    cert = x509.load_pem_x509_certificate(pem.encode())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    spiffe = [u for u in uris if u.lower().startswith("spiffe://")]
    subject = cert.subject.rfc4514_string()
    if len(spiffe) > 1:
        # An X.509 SVID has exactly one URI SAN (SPIFFE X509-SVID §2): which one would win?
        return PeerIdentity(subject, None, "the certificate names more than one SPIFFE ID")
    if spiffe:
        return PeerIdentity(spiffe[0], spiffe[0])
    return PeerIdentity(subject, None)


def trust_domain(spiffe_id: str) -> str:
    """`spiffe://example.org/a/b` -> `example.org` (lower case, as SPIFFE compares it)."""
    rest = spiffe_id[len("spiffe://") :]
    return rest.split("/", 1)[0].lower()


@dataclass(frozen=True)
class Mapped:
    customer_id: str | None  # None: an operator or admin acting for no customer of its own
    role: Role


class IdentityMap:
    """identity -> (customer, role), from the identities file's text."""

    def __init__(self, entries: dict[str, Mapped]) -> None:
        self._entries = entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, identity: str) -> Mapped | None:
        return self._entries.get(identity)

    @classmethod
    def parse(cls, text: str, origin: str) -> IdentityMap:
        entries: dict[str, Mapped] = {}
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(None, 2)
            if len(parts) != 3:
                raise ValueError(f"{origin}:{number}: expected '<customer_id> <role> <identity>'")
            customer, role, identity = parts[0], parts[1], parts[2].strip()
            try:
                parsed_role = Role(role)
            except ValueError:
                roles = ", ".join(r.value for r in Role)
                raise ValueError(
                    f"{origin}:{number}: role {role!r} is not one of {roles}"
                ) from None
            if customer == "-":
                if parsed_role is Role.CUSTOMER:
                    raise ValueError(
                        f"{origin}:{number}: a customer's identity needs its customer id"
                    )
                mapped = Mapped(None, parsed_role)
            elif CUSTOMER_ID.fullmatch(customer):
                mapped = Mapped(customer, parsed_role)
            else:
                raise ValueError(f"{origin}:{number}: {customer!r} is not a customer id")
            if identity in entries:
                raise ValueError(f"{origin}:{number}: {identity!r} is listed twice")
            entries[identity] = mapped
        return cls(entries)

    @classmethod
    def from_file(cls, path: Path) -> IdentityMap:
        return cls.parse(path.read_text(), str(path))


class IdentitiesFile:
    """The identities file, re-read when it changes (checked with the TLS files, and on
    SIGHUP): adding a customer's identity needs no restart, and a removed one is refused
    from its next call on. A bad new version is logged and the one read before stays in use
    (as with a bad certificate: a typo must not lock every client out)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp = _stamp(path)
        self.current = IdentityMap.from_file(path)  # OSError, ValueError: start-up stops

    def get(self, identity: str) -> Mapped | None:
        return self.current.get(identity)

    def check(self, force: bool = False) -> bool:
        """Re-read the file if it changed (or `force`); whether a new version is in use."""
        stamp = _stamp(self._path)
        if stamp == self._stamp and not force:
            return False
        self._stamp = stamp
        try:
            identities = IdentityMap.from_file(self._path)
        except (OSError, ValueError) as exc:
            log.error(
                "identities file reload FAILED, the %d identities read before stay in use: %s",
                len(self.current), exc, extra={"event": "tls_reload_failed"},
            )  # fmt: skip
            return False
        self.current = identities
        log.info("identities file %s reloaded: %d identities", self._path, len(identities))
        return True


def _stamp(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class Identities(Protocol):
    def get(self, identity: str) -> Mapped | None: ...


@dataclass(frozen=True)
class SpiffePolicy:
    """spiffe mode: only these trust domains, and (if any are given) only these IDs."""

    trust_domains: frozenset[str]
    allowed_ids: frozenset[str] = frozenset()

    def refusal(self, peer: PeerIdentity) -> str | None:
        """Why `peer` is not accepted, or None."""
        if peer.spiffe_id is None:
            return "the client certificate carries no SPIFFE ID"
        if trust_domain(peer.spiffe_id) not in self.trust_domains:
            return f"trust domain {trust_domain(peer.spiffe_id)!r} is not accepted"
        if self.allowed_ids and peer.spiffe_id not in self.allowed_ids:
            return f"SPIFFE ID {peer.spiffe_id!r} is not accepted"
        return None


class CertificateAuthenticator:
    """The caller of a call on an mTLS connection, from its client certificate.

    A bearer token sent as well must be valid and name the certificate's customer: the
    certificate says who is calling, and a token for someone else is refused rather than
    silently ignored (it means a confused or a malicious client)."""

    def __init__(self, identities: Identities, policy: SpiffePolicy | None = None) -> None:
        self._identities = identities
        self._policy = policy

    async def caller(
        self, pem: str | None, authorization: str | None, tokens: TokenAuthenticator
    ) -> Caller:
        """The certificate's Caller (the interceptor adds the source and the tenant header)."""
        if pem is None:
            raise TokenRefused("certificate", "a client certificate is required")
        peer = identity_of(pem)
        if peer.problem is not None:
            raise TokenRefused("certificate", f"client certificate refused: {peer.problem}")
        why = self._policy.refusal(peer) if self._policy is not None else None
        if why is not None:
            raise TokenRefused("certificate", f"client certificate refused: {why}")
        mapped = self._identities.get(peer.id)
        if mapped is None:
            raise TokenRefused("certificate", f"unknown client certificate identity {peer.id!r}")
        if authorization:
            bearer = await tokens.caller_for(authorization)
            if bearer.customer_id != mapped.customer_id:
                raise TokenRefused(
                    "certificate",
                    "the bearer token names another customer than the client certificate",
                )
        return Caller(actor=f"mtls:{peer.id}", role=mapped.role, customer_id=mapped.customer_id)
