"""Structured log lines for the node: `ts=... level=... logger=... <message>` (logfmt).

Runtime messages are already `event=<name> key=value ...`; this formatter prefixes the
time, level and logger, and quotes a plain-text message so every line stays parseable
(`--log-format json` gives one JSON object per line instead).
"""

from __future__ import annotations

import json
import logging
import re
import sys

_KV = re.compile(r"^[a-z_]+=")


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if not _KV.match(msg):
            msg = "msg=" + json.dumps(msg, ensure_ascii=False)
        elif "\n" in msg or "\r" in msg:  # one record, one line, always
            msg = msg.replace("\r", "\\r").replace("\n", "\\n")
        line = (
            f"ts={record.created:.3f} level={record.levelname.lower()} logger={record.name} {msg}"
        )
        if record.exc_info:
            line += " exc=" + json.dumps(self.formatException(record.exc_info))
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        msg = record.getMessage()
        fields = _parse_kv(msg)
        if fields is None:
            out["msg"] = msg
        else:
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


_PAIR = re.compile(r'([a-z_]+)=("(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|\S*)')


def _parse_kv(msg: str) -> dict[str, str] | None:
    if not _KV.match(msg):
        return None
    return {k: v.strip("'\"") for k, v in _PAIR.findall(msg)}


def setup_logging(level: str = "INFO", fmt: str = "logfmt") -> None:
    """Route every logger to stderr with the chosen structured format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # py-libp2p is chatty at INFO; keep it to warnings unless asked for debug
    if root.level > logging.DEBUG:
        for name in ("libp2p", "multiaddr", "hypercorn", "zeroconf", "httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)
