"""UNKEY_METALD_TLS_* to the API port's TLS (api/tls.py) and mTLS callers (api/mtls.py).

Wiring, beside app.py (which calls it): which files each mode reads, and every refusal of a
configuration that would serve less security than it asks for. TLS settings while the mode
is `disabled`, mTLS without an identities file, spiffe mode without a trust domain: each
stops start-up (TlsError, naming the variable) instead of serving plaintext or letting any
certificate of a CA act.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from metald.api.mtls import CertificateAuthenticator, IdentitiesFile, SpiffePolicy
from metald.api.tls import ReloadingTls, TlsError, TlsFile, TlsFiles
from metald.config import Settings, TlsMode

P = "UNKEY_METALD_TLS_"
# The names spiffe-helper writes by default (svid_file_name, svid_key_file_name,
# svid_bundle_file_name).
SPIFFE_FILES = ("svid.pem", "svid_key.pem", "svid_bundle.pem")


log = logging.getLogger("metald.tls")


@dataclass
class TlsSetup:
    tls: ReloadingTls
    certificates: CertificateAuthenticator | None  # None: no client certificates asked
    reload_seconds: float = 5.0  # 0: only on SIGHUP
    identities: IdentitiesFile | None = None  # with client certificates

    def check(self, force: bool = False) -> None:
        """Re-read what changed: the TLS files, the identities file."""
        self.tls.check(force)
        if self.identities is not None:
            self.identities.check(force)

    async def run(self) -> None:
        """`check` every reload_seconds until cancelled."""
        while True:
            await asyncio.sleep(self.reload_seconds)
            try:
                self.check()
            except Exception:  # never let the watcher die: the next check may succeed
                log.exception("TLS reload check failed")


def _file(path: Path | None, name: str) -> TlsFile | None:
    return TlsFile(path, P + name) if path is not None else None


def _csv(value: str) -> frozenset[str]:
    return frozenset(v.strip() for v in value.split(",") if v.strip())


def _files(settings: Settings) -> TlsFiles:
    cert = _file(settings.tls_cert_file, "CERT_FILE")
    key = _file(settings.tls_key_file, "KEY_FILE")
    ca = _file(settings.tls_ca_file, "CA_FILE")
    if settings.tls_mode is TlsMode.SPIFFE and settings.tls_spiffe_dir is not None:
        # The agent's directory; an explicit file of the three overrides its name there.
        folder = settings.tls_spiffe_dir
        variable = P + "SPIFFE_DIR"
        cert = cert or TlsFile(folder / SPIFFE_FILES[0], variable)
        key = key or TlsFile(folder / SPIFFE_FILES[1], variable)
        ca = ca or TlsFile(folder / SPIFFE_FILES[2], variable)
    if cert is None or key is None:
        where = f"{P}CERT_FILE and {P}KEY_FILE"
        if settings.tls_mode is TlsMode.SPIFFE:
            where = f"{P}SPIFFE_DIR (or {where} and {P}CA_FILE)"
        raise TlsError(f"{P}MODE={settings.tls_mode.value} needs {where}")
    if settings.tls_mode is TlsMode.SPIFFE and ca is None:
        raise TlsError(f"{P}MODE=spiffe needs the trust bundle: {P}SPIFFE_DIR or {P}CA_FILE")
    return TlsFiles(cert, key, ca)


def tls_setup(settings: Settings) -> TlsSetup | None:
    """The API port's TLS, or None (plaintext); TlsError for anything that cannot serve."""
    if settings.tls_mode is TlsMode.DISABLED:
        stray = [
            P + name.upper()
            for name in ("cert_file", "key_file", "ca_file", "identities_file", "spiffe_dir")
            if getattr(settings, "tls_" + name) is not None
        ]
        if stray:
            raise TlsError(
                f"{', '.join(stray)} set, but {P}MODE=disabled would serve plaintext: set "
                f"{P}MODE=file (or spiffe), or unset them"
            )
        return None
    if settings.http_server.value != "hypercorn":
        raise TlsError(
            f"{P}MODE={settings.tls_mode.value} is served by hypercorn only: unset "
            f"UNKEY_METALD_HTTP_SERVER (={settings.http_server.value})"
        )
    files = _files(settings)
    policy = None
    if settings.tls_mode is TlsMode.SPIFFE:
        domains = frozenset(d.lower() for d in _csv(settings.tls_spiffe_trust_domains))
        if not domains:
            raise TlsError(f"{P}MODE=spiffe needs {P}SPIFFE_TRUST_DOMAINS (e.g. example.org)")
        ids = _csv(settings.tls_spiffe_allowed_ids)
        bad = sorted(i for i in ids if not i.startswith("spiffe://"))
        if bad:
            raise TlsError(f"{P}SPIFFE_ALLOWED_IDS: {', '.join(bad)} is no spiffe:// ID")
        policy = SpiffePolicy(domains, ids)
    tls = ReloadingTls(files)
    certificates = identities = None
    if tls.mutual:
        path = settings.tls_identities_file
        if path is None:
            raise TlsError(
                f"client certificates are required ({files.ca.variable if files.ca else ''}"
                f" is set), so {P}IDENTITIES_FILE must say which identity is which customer"
            )
        try:
            identities = IdentitiesFile(path)
        except OSError as exc:
            raise TlsError(f"{P}IDENTITIES_FILE={path}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise TlsError(f"{P}IDENTITIES_FILE: {exc}") from None
        certificates = CertificateAuthenticator(identities, policy)
    elif settings.tls_identities_file is not None:
        raise TlsError(f"{P}IDENTITIES_FILE is set, but no {P}CA_FILE asks for client certificates")
    return TlsSetup(tls, certificates, settings.tls_reload_seconds, identities)
