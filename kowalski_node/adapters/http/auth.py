"""Who may talk to the API: loopback by default, a bearer token whenever one is set.

A node bound beyond loopback without a token would let anyone on the LAN submit code to
the cluster, so `check_bind` refuses to start it.
"""

from __future__ import annotations

import hmac
import ipaddress

from kowalski_node.errors import ConfigError

MIN_TOKEN_CHARS_WIDE = 16
OPEN_PATHS = frozenset({"/healthz", "/v1/health"})


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 and `localhost`; names that need resolving are not trusted."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse a non-loopback bind without a (long enough) token, with the fix in the message."""
    if token is not None and not token.strip():
        raise ConfigError("node.api.token is empty; set a real token or leave it unset")
    if is_loopback_host(host):
        return
    if token is None:
        raise ConfigError(
            f"refusing to serve the HTTP API on {host} without a token: anyone who can reach "
            "it could run code on this cluster. Set node.api.token (or "
            "KOWALSKI_NODE__API__TOKEN), or bind to 127.0.0.1"
        )
    if len(token) < MIN_TOKEN_CHARS_WIDE:
        raise ConfigError(
            f"node.api.token is too short ({len(token)} characters) for an API bound to "
            f"{host}; use at least {MIN_TOKEN_CHARS_WIDE} random characters "
            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )


def bearer_ok(header: str | None, token: str) -> bool:
    """Constant-time check of an `Authorization: Bearer <token>` header."""
    if not header:
        return False
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode("utf-8"), token.encode("utf-8"))
