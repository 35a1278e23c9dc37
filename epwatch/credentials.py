"""Reading the files behind the transport flags (``--tls-*``, ``--token-file``) with
errors an operator can act on. Used by the agent and the collector alike."""

from __future__ import annotations

import logging
import os
import stat

log = logging.getLogger(__name__)


class CredentialError(ValueError):
    """A certificate, key or token file cannot be used; the message says why."""


def read_pem(path: str, what: str) -> bytes:
    """A PEM file's bytes (certificate, key or CA bundle)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise CredentialError(f"cannot read {what} {path}: {exc.strerror}") from None
    if b"-----BEGIN " not in data:
        raise CredentialError(f"{what} {path} is not PEM (no -----BEGIN line)")
    return data


def read_token(path: str) -> bytes:
    """A bearer token: the file's first line, at least 16 characters. A file others
    may read works, with a warning (a Kubernetes secret volume is 0644 by default)."""
    try:
        with open(path, "rb") as f:
            token = f.read().strip().split(b"\n", 1)[0].strip()
            mode = os.fstat(f.fileno()).st_mode
    except OSError as exc:
        raise CredentialError(f"cannot read token file {path}: {exc.strerror}") from None
    if len(token) < 16:
        raise CredentialError(f"token file {path} holds fewer than 16 characters")
    if mode & stat.S_IROTH:
        log.warning("token file %s is readable by every user; chmod 600 it", path)
    return token


def load_flag_files(
    command: str, pems: dict[str, str | None], token_file: str | None = None
) -> tuple[dict[str, bytes | None], bytes | None]:
    """The PEM files named by flags (``{"--tls-cert": path or None}``) and the token,
    read for ``epwatch <command>``; exits with the reason when one cannot be used."""
    try:
        files = {flag: read_pem(path, flag) if path else None for flag, path in pems.items()}
        return files, read_token(token_file) if token_file else None
    except CredentialError as err:
        raise SystemExit(f"epwatch {command}: {err}") from None
