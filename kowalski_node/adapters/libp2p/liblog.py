"""py-libp2p's own log records, made quiet and one line each.

py-libp2p logs expected failures (a dial to a gone peer, a stream a peer's software
does not speak) at ERROR, some as multi-line dumps, and on import it detaches its
`libp2p` logger from the root, so those records went to Python's last-resort handler:
unformatted text on stderr, ~2.6 lines a second per gone peer. The transport turns
every such failure into its own structured event (`peer_unreachable`, once per backoff
step), so here the library's records are

* dropped unless the node logs at DEBUG, where they pass as one line each (newlines
  folded, tracebacks in the formatter's one-line `exc=` field);
* except "a peer does not speak this protocol", which is reported once per peer and
  protocol list as `event=peer_protocol_unsupported` (e.g. a js-libp2p peer that
  connects but speaks none of our protocols).
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger("kowalski_node.adapters.libp2p.transport")

_UNSUPPORTED = re.compile(r"protocols? not supported|no protocols? (?:could be|were) negotiated")
_PEER = re.compile(r"peer (12D3Koo\w+|Qm\w+)")
_PROTOCOLS = re.compile(r"Protocols: (\[[^\]]*\])")


class LibraryLogHandler(logging.Handler):
    """Installed on the `libp2p` logger; see the module docstring."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.reported: set[tuple[str, str]] = set()
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a library record with bad %-args must not kill logging
            text = str(record.msg)
        if _UNSUPPORTED.search(text):
            peer = _PEER.search(text)
            protocols = _PROTOCOLS.search(text)
            self.protocol_unsupported(
                peer.group(1) if peer else "?", protocols.group(1) if protocols else "?"
            )
        root = logging.getLogger()
        if not root.isEnabledFor(logging.DEBUG):
            self.dropped += 1
            return
        flat = logging.makeLogRecord(record.__dict__)
        flat.msg = "library: " + " | ".join(line.strip() for line in text.splitlines())
        flat.args = None
        flat.levelno, flat.levelname = logging.DEBUG, "DEBUG"
        for handler in root.handlers:
            if flat.levelno >= handler.level:
                handler.handle(flat)

    def protocol_unsupported(self, peer: str, protocols: str) -> None:
        """Log once per (peer, protocols) that a connected peer does not speak them."""
        key = (peer, protocols)
        if key in self.reported:
            return
        self.reported.add(key)
        log.info(
            "event=peer_protocol_unsupported peer=%s protocols=%s detail=%r",
            peer,
            protocols.replace(" ", ""),
            "the peer is connected but does not speak this protocol (another libp2p "
            "application, or an incompatible kowalski-node version); reported once",
        )


_HANDLER: LibraryLogHandler | None = None


def route_library_logs() -> LibraryLogHandler:
    """(Re)attach the handler; py-libp2p resets its logger on import, so call after it."""
    global _HANDLER
    if _HANDLER is None:
        _HANDLER = LibraryLogHandler()
    lib = logging.getLogger("libp2p")
    for handler in list(lib.handlers):
        if handler is not _HANDLER:
            lib.removeHandler(handler)
    if _HANDLER not in lib.handlers:
        lib.addHandler(_HANDLER)
    lib.propagate = False
    debug = logging.getLogger().isEnabledFor(logging.DEBUG)
    lib.setLevel(logging.DEBUG if debug else logging.WARNING)
    return _HANDLER
