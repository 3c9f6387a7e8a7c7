"""`serve_api`: the HTTP API on hypercorn's trio server, inside the caller's nursery.

Start it with `endpoint = await nursery.start(serve_api, service, "127.0.0.1", 0, None)`:
`endpoint.url` has the real port when 0 was asked for. Stop it by cancelling the nursery,
or gracefully by passing a `shutdown_trigger` that returns when it is time to stop.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from kowalski_node.config import DEFAULT_API_PORT
from kowalski_node.errors import ConfigError
from kowalski_node.remote.completions import CompletionRouter
from kowalski_node.runtime.service import NodeService

from .app import DEFAULT_KEEPALIVE_S, DEFAULT_MAX_BATCH, DEFAULT_MAX_BODY_BYTES, create_app
from .auth import check_bind

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger("kowalski_node.http")


@dataclass(frozen=True)
class ApiEndpoint:
    """Where the API listens, as `serve_api` reports it once the socket is bound."""

    host: str
    port: int
    url: str
    token_required: bool


def parse_api_address(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """`HOST:PORT`, `[V6]:PORT`, `:PORT`, `PORT` or a URL (for `--api`); ConfigError when
    invalid. One parser for every address the CLI takes (`kowalski_node.addresses`)."""
    from kowalski_node.addresses import API_EXAMPLE, split_host_port

    raw = text.strip()
    if raw.startswith(("http://", "https://")):
        raw = urlsplit(raw).netloc
    return split_host_port(raw, "API address", API_EXAMPLE, default_host)


def _bind_text(host: str, port: int) -> str:
    return f"[{host.strip('[]')}]:{port}" if ":" in host.strip("[]") else f"{host}:{port}"


def _unwrap_os_error(exc: BaseException) -> OSError | None:
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _unwrap_os_error(inner)
            if found is not None:
                return found
    return None


async def serve_api(
    service: NodeService,
    host: str = "127.0.0.1",
    port: int = DEFAULT_API_PORT,
    token: str | None = None,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_batch: int = DEFAULT_MAX_BATCH,
    keepalive_s: float = DEFAULT_KEEPALIVE_S,
    spool_dir: Path | None = None,
    graceful_timeout_s: float = 2.0,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    completions: CompletionRouter | None = None,
    task_status: TaskStatus[ApiEndpoint] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled or `shutdown_trigger` returns.

    Raises `ConfigError` before binding when `host` is not loopback and no (long enough)
    token is set, and when the address cannot be bound (in use, not local).
    """
    check_bind(host, token)
    app = create_app(
        service,
        token=token,
        max_body_bytes=max_body_bytes,
        max_batch=max_batch,
        keepalive_s=keepalive_s,
        spool_dir=spool_dir,
        completions=completions,
    )
    config = Config()
    config.bind = [_bind_text(host, port)]
    config.accesslog = None
    config.errorlog = logging.getLogger("kowalski_node.http.server")
    config.graceful_timeout = graceful_timeout_s
    config.include_server_header = False
    started = False
    try:
        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(
                partial(serve, app, config, shutdown_trigger=shutdown_trigger)  # type: ignore[arg-type]
            )
            bound = urlsplit(binds[0])
            real_port = bound.port if bound.port is not None else port
            endpoint = ApiEndpoint(
                host=host,
                port=real_port,
                url=f"http://{_bind_text(host, real_port)}",
                token_required=token is not None,
            )
            log.info(
                "HTTP API listening on %s (token %s)",
                endpoint.url,
                "required" if token else "not required",
            )
            started = True
            task_status.started(endpoint)
    except (OSError, BaseExceptionGroup) as exc:
        os_error = None if started else _unwrap_os_error(exc)
        if os_error is None:
            raise
        raise ConfigError(
            f"cannot serve the HTTP API on {_bind_text(host, port)}: "
            f"{os_error.strerror or os_error}; is another node running? "
            "choose another address with --api HOST:PORT (node.api.port)"
        ) from exc
