"""``--web-config FILE``: TLS, client certificates and basic auth for the HTTP side
(/metrics and every JSON route), in the Prometheus exporter-toolkit's file format, so
the file a node_exporter uses works here too:

    tls_server_config:
      cert_file: server.crt
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert
      client_ca_file: ca.crt
    basic_auth_users:
      prometheus: $2y$10$...   # bcrypt hash (htpasswd -nBC 10 "" | tr -d ':\n')

Relative paths are relative to the file. Keys this server cannot honour are an error,
not ignored: a security setting that silently does nothing is worse than none.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import ssl
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class WebConfigError(ValueError):
    """The web config file cannot be used; the message says why."""


_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_VERSIONS = {
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
_TLS_KEYS = {
    "cert_file",
    "key_file",
    "client_auth_type",
    "client_ca_file",
    "min_version",
    "max_version",
    "client_allowed_sans",
}
_TOP_KEYS = {"tls_server_config", "basic_auth_users", "http_server_config"}


class BasicAuth:
    """bcrypt-checked users. A bcrypt check costs tens of milliseconds on purpose, so
    credentials that passed are remembered (as a SHA-256 of user and password) and a
    scrape every few seconds does not pay it again."""

    def __init__(self, users: Mapping[str, bytes], remembered: int = 64) -> None:
        self.users = dict(users)
        self._ok: OrderedDict[bytes, None] = OrderedDict()
        self._remembered = remembered
        self._lock = threading.Lock()

    def check(self, header: str | None) -> bool:
        """True when an ``Authorization: Basic ...`` header names a user and password."""
        import bcrypt

        if not header:
            return False
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(encoded.strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        hashed = self.users.get(user.decode(errors="replace"))
        if not sep or hashed is None:
            # Hash anyway so that a wrong user name takes as long as a wrong password.
            bcrypt.checkpw(password, _dummy_hash())
            return False
        key = hashlib.sha256(user + b"\0" + password + b"\0" + hashed).digest()
        with self._lock:
            if key in self._ok:
                self._ok.move_to_end(key)
                return True
        if not bcrypt.checkpw(password, hashed):
            return False
        with self._lock:
            self._ok[key] = None
            while len(self._ok) > self._remembered:
                self._ok.popitem(last=False)
        return True


@functools.cache
def _dummy_hash() -> bytes:
    """A bcrypt hash at cost 10, for timing-equal refusals of unknown users."""
    import bcrypt

    return bcrypt.hashpw(b"epwatch", bcrypt.gensalt(10))


@dataclass
class WebSecurity:
    """What the HTTP server asks of a client; empty: plaintext and no login."""

    ssl_context: ssl.SSLContext | None = None
    auth: BasicAuth | None = None
    allowed_sans: frozenset[str] = frozenset()
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def tls(self) -> bool:
        return self.ssl_context is not None


def load_web_config(path: str | Path) -> WebSecurity:
    """Parse an exporter-toolkit web config file; WebConfigError says what is wrong."""
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise WebConfigError(f"cannot read web config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise WebConfigError(f"web config {path} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise WebConfigError(f"web config {path} must be a mapping")
    _only(doc, _TOP_KEYS, str(path))
    security = WebSecurity()
    tls = doc.get("tls_server_config")
    if tls:
        security.ssl_context, security.allowed_sans = _tls(tls, path.parent)
    users = doc.get("basic_auth_users")
    if users:
        if not isinstance(users, dict):
            raise WebConfigError("basic_auth_users must map user names to bcrypt hashes")
        hashes = {}
        for user, hashed in users.items():
            if not isinstance(hashed, str) or not hashed.startswith(("$2a$", "$2b$", "$2y$")):
                raise WebConfigError(f"basic_auth_users: {user!r} needs a bcrypt hash ($2y$...)")
            hashes[str(user)] = hashed.encode()
        security.auth = BasicAuth(hashes)
    http = doc.get("http_server_config") or {}
    _only(http, {"headers", "http2"}, "http_server_config")
    security.headers = {str(k): str(v) for k, v in (http.get("headers") or {}).items()}
    return security


def _only(section: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise WebConfigError(
            f"{where}: {', '.join(unknown)} not supported (supported: {', '.join(sorted(allowed))})"
        )


def _tls(tls: Mapping[str, Any], base: Path) -> tuple[ssl.SSLContext, frozenset[str]]:
    _only(tls, _TLS_KEYS, "tls_server_config")
    if not tls.get("cert_file") or not tls.get("key_file"):
        raise WebConfigError("tls_server_config needs cert_file and key_file")
    mode_name = tls.get("client_auth_type", "NoClientCert")
    if mode_name not in _CLIENT_AUTH:
        raise WebConfigError(
            f"client_auth_type {mode_name!r} not supported (use one of {', '.join(_CLIENT_AUTH)})"
        )
    mode = _CLIENT_AUTH[mode_name]
    ca = tls.get("client_ca_file")
    if mode != ssl.CERT_NONE and not ca:
        raise WebConfigError(f"client_auth_type {mode_name} needs client_ca_file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _version(tls.get("min_version", "TLS12"), "min_version")
    if "max_version" in tls:
        ctx.maximum_version = _version(tls["max_version"], "max_version")
    try:
        ctx.load_cert_chain(base / tls["cert_file"], base / tls["key_file"])
        if ca:
            ctx.load_verify_locations(cafile=base / ca)
    except (OSError, ssl.SSLError) as exc:
        raise WebConfigError(f"tls_server_config: cannot load certificates: {exc}") from None
    ctx.verify_mode = mode
    sans = frozenset(str(s) for s in tls.get("client_allowed_sans") or ())
    if sans and mode == ssl.CERT_NONE:
        raise WebConfigError("client_allowed_sans needs client certificates (client_auth_type)")
    return ctx, sans


def _version(name: str, key: str) -> ssl.TLSVersion:
    if name not in _VERSIONS:
        raise WebConfigError(f"{key} {name!r} not supported (use {' or '.join(_VERSIONS)})")
    return _VERSIONS[name]


def certificate_names(cert: Mapping[str, Any] | None) -> set[str]:
    """DNS and other SANs of a peer certificate (``SSLSocket.getpeercert()``)."""
    if not cert:
        return set()
    return {value for _, value in cert.get("subjectAltName", ())}
