"""The node's local HTTP API: task submission, status, peers, events and /metrics."""

from .app import ApiOptions, create_app
from .auth import check_bind, is_loopback_host
from .server import ApiEndpoint, parse_api_address, serve_api

__all__ = [
    "ApiEndpoint",
    "ApiOptions",
    "check_bind",
    "create_app",
    "is_loopback_host",
    "parse_api_address",
    "serve_api",
]
