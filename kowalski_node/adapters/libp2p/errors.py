"""Transport errors, by meaning; and unwrapping of py-libp2p's nested exception groups."""

from __future__ import annotations

from collections.abc import Iterator

from kowalski_node.errors import KowalskiError


class TransportError(KowalskiError):
    """A network operation failed; the message says what and where."""


class DialError(TransportError):
    """Could not connect to a peer. `reason` is one of the REASON_* constants."""

    REASON_BAD_ADDRESS = "bad_address"
    REASON_UNREACHABLE = "unreachable"
    REASON_KEY_MISMATCH = "key_mismatch"
    REASON_HANDSHAKE = "handshake"
    REASON_NOT_ALLOWED = "not_allowed"
    REASON_TIMEOUT = "timeout"
    REASON_BACKOFF = "backoff"  # recently failed; not dialled again until its window passes

    def __init__(self, message: str, reason: str, address: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.address = address


class ClusterKeyMismatch(DialError):
    """The peer answered with undecryptable data: it holds another cluster key (or none)."""

    def __init__(self, message: str, address: str = "") -> None:
        super().__init__(message, DialError.REASON_KEY_MISMATCH, address)


class RequestTimeout(TransportError):
    """No reply arrived before the deadline (the peer may be paused, overloaded or gone)."""


class ConnectionLost(TransportError):
    """The stream or connection closed while a reply was pending (e.g. the peer died)."""


class ProtocolViolation(TransportError):
    """The peer sent bytes that break the protocol (bad framing, undecodable reply)."""


class ProtocolNotSupported(TransportError):
    """The peer does not serve this protocol ID (another major version, or not that role)."""

    def __init__(self, protocol: str, peer_id: str) -> None:
        super().__init__(f"peer {peer_id} does not support {protocol}")
        self.protocol = protocol
        self.peer_id = peer_id


class RemoteError(TransportError):
    """The peer answered with an error reply; `code` is one of envelope.ERR_*."""

    def __init__(self, code: str, message: str, peer_id: str = "", protocol: str = "") -> None:
        where = f" from {peer_id} on {protocol}" if peer_id else ""
        super().__init__(f"remote error{where}: {code}: {message}")
        self.code = code
        self.remote_message = message
        self.peer_id = peer_id
        self.protocol = protocol


class RequestRejected(KowalskiError):
    """Raised by a request handler to send a specific error reply instead of `internal`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def iter_leaf_exceptions(exc: BaseException, _depth: int = 0) -> Iterator[BaseException]:
    """Leaves of exception groups, MultiErrors and `raise ... from` chains, deepest last."""
    if _depth > 20:
        yield exc
        return
    children: list[BaseException] = []
    if isinstance(exc, BaseExceptionGroup):
        children = list(exc.exceptions)
    else:
        errors = getattr(exc, "errors", None)  # libp2p.exceptions.MultiError
        if isinstance(errors, list | tuple) and all(isinstance(e, BaseException) for e in errors):
            children = list(errors)
    if children:
        for child in children:
            yield from iter_leaf_exceptions(child, _depth + 1)
        return
    yield exc
    cause = exc.__cause__
    if cause is not None:
        yield from iter_leaf_exceptions(cause, _depth + 1)


def describe_exception(exc: BaseException, limit: int = 4) -> str:
    """One readable line from a nested library error: distinct leaf messages, outermost first."""
    seen: list[str] = []
    for leaf in iter_leaf_exceptions(exc):
        text = str(leaf).strip() or type(leaf).__name__
        line = f"{type(leaf).__name__}: {text}" if text != type(leaf).__name__ else text
        if line not in seen:
            seen.append(line)
    if not seen:
        return type(exc).__name__
    return " <- ".join(seen[:limit]) + (" ..." if len(seen) > limit else "")
