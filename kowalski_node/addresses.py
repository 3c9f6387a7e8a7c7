"""Address parsing for every flag and setting a user types: one spelling rule, one-line errors.

* p2p listen addresses (`start --listen`, `node.listen`): a multiaddr
  (`/ip4/0.0.0.0/tcp/7470`) or `HOST:PORT` (`127.0.0.1:7470`, `[::1]:7470`, `:7470`).
* HTTP API addresses (`--api` on every command, `$KOWALSKI_API`, `ClusterConfig.api_url`):
  `HOST:PORT`, `:PORT`, `PORT` or a URL (`http://127.0.0.1:7471`).

Everything invalid raises `ConfigError` with a message naming the input and an example,
so the CLI prints one line and exits 1 instead of a library traceback. This module
imports no libp2p (multiaddr is imported only to validate a multiaddr).
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from kowalski_node.errors import ConfigError

LISTEN_EXAMPLE = "/ip4/0.0.0.0/tcp/7470 or 0.0.0.0:7470"
API_EXAMPLE = "127.0.0.1:7471 or http://127.0.0.1:7471"


def split_host_port(text: str, what: str, example: str, default_host: str) -> tuple[str, int]:
    """`HOST:PORT`, `[V6]:PORT`, `:PORT` or `PORT` -> (host, port); ConfigError when invalid."""
    raw = text.strip()
    if not raw:
        raise ConfigError(f"{what} is empty (expected e.g. {example})")
    host, port_text = default_host, raw
    if raw.startswith("["):
        end = raw.find("]")
        if end < 0 or not raw[end + 1 :].startswith(":"):
            raise ConfigError(f"{what} {text!r}: expected [IPV6]:PORT (e.g. {example})")
        host, port_text = raw[1:end], raw[end + 2 :]
    elif ":" in raw:
        head, _, port_text = raw.rpartition(":")
        if ":" in head:
            raise ConfigError(f"{what} {text!r}: write IPv6 hosts as [ADDR]:PORT")
        host = head or default_host
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(
            f"{what} {text!r}: port {port_text!r} is not a number (expected e.g. {example})"
        ) from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{what} {text!r}: port must be 0..65535")
    if not host or any(c.isspace() or c in "/?#@" for c in host):
        raise ConfigError(f"{what} {text!r}: bad host {host!r} (expected e.g. {example})")
    return host, port


def _validate_multiaddr(text: str, what: str) -> str:
    from multiaddr import Multiaddr

    try:
        Multiaddr(text)
    except Exception as exc:  # noqa: BLE001 - py-multiaddr raises many unrelated types for bad input
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{what} {text!r} is not a valid multiaddr ({detail})") from None
    return text


def listen_multiaddr(text: str) -> str:
    """A `--listen` value as a TCP multiaddr; `HOST:PORT` becomes `/ip4|ip6/HOST/tcp/PORT`."""
    what = "listen address"
    raw = str(text).strip()
    if raw.startswith("/"):
        _validate_multiaddr(raw, what)
        if "/tcp/" not in raw:
            raise ConfigError(f"{what} {raw!r} has no /tcp/PORT (expected e.g. {LISTEN_EXAMPLE})")
        return raw
    host, port = split_host_port(raw, what, LISTEN_EXAMPLE, default_host="0.0.0.0")  # noqa: S104 - the p2p listener serves the LAN by design (docs/configuration.md)
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            f"{what} {text!r}: {host!r} is not an IP address; a node listens on an interface "
            f"address (e.g. {LISTEN_EXAMPLE})"
        ) from None
    family = "ip4" if ip.version == 4 else "ip6"
    return f"/{family}/{ip}/tcp/{port}"


def listen_host_port(multiaddr: str) -> tuple[str, int] | None:
    """(ip, port) of a TCP multiaddr like `/ip4/1.2.3.4/tcp/7470`; None for other kinds."""
    parts = multiaddr.strip("/").split("/")
    if len(parts) < 4 or parts[0] not in ("ip4", "ip6") or parts[2] != "tcp":
        return None
    try:
        return parts[1], int(parts[3])
    except ValueError:
        return None


def api_url(text: str) -> str:
    """An HTTP API address as a base URL: `HOST:PORT` -> `http://HOST:PORT`; URLs checked."""
    what = "API address"
    raw = str(text).strip()
    if "://" in raw:
        parts = urlsplit(raw)
        if parts.scheme not in ("http", "https"):
            raise ConfigError(
                f"{what} {text!r}: scheme must be http or https (expected e.g. {API_EXAMPLE})"
            )
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(f"{what} {text!r}: the port is not a number 0..65535") from None
        if not parts.hostname:
            raise ConfigError(f"{what} {text!r} has no host (expected e.g. {API_EXAMPLE})")
        if parts.query or parts.fragment:
            raise ConfigError(f"{what} {text!r}: a base URL has no ?query or #fragment")
        del port
        return raw.rstrip("/")
    host, port = split_host_port(raw, what, API_EXAMPLE, default_host="127.0.0.1")
    if host in ("0.0.0.0", "::"):  # noqa: S104 - a comparison: a wildcard host is mapped to loopback for clients
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"
