"""Protocol IDs of the kowalski wire protocols: `/kowalski/<name>/<major.minor.patch>`.

A peer that does not speak a protocol ID (wrong name or major version) fails
multistream negotiation, so incompatible peers never exchange a frame. Minor and
patch bumps stay on the same ID only when the change is additive; see
protocols/README.md for the rules.
"""

from __future__ import annotations

import re

MEMBERSHIP = "/kowalski/membership/1.0.0"
TASK = "/kowalski/task/1.0.0"
REPL = "/kowalski/repl/1.0.0"
LLM = "/kowalski/llm/1.0.0"
FOLD = "/kowalski/fold/1.0.0"
SHARD = "/kowalski/shard/1.0.0"
BLOB = "/kowalski/blob/1.0.0"
CONTEXT = "/kowalski/context/1.0.0"  # task contexts pulled as blobs (runtime/contexts.py)

ALL_PROTOCOLS = (MEMBERSHIP, TASK, REPL, LLM, FOLD, SHARD, BLOB, CONTEXT)

_PROTOCOL_RE = re.compile(r"^/kowalski/[a-z][a-z0-9_-]*/\d+\.\d+\.\d+$")


def is_kowalski_protocol(protocol: str) -> bool:
    return bool(_PROTOCOL_RE.match(protocol))


def check_protocol(protocol: str) -> str:
    """Return `protocol` if it is a well-formed kowalski protocol ID, else raise ValueError."""
    if not is_kowalski_protocol(protocol):
        raise ValueError(
            f"protocol ID {protocol!r} must look like /kowalski/<name>/<major>.<minor>.<patch>"
        )
    return protocol
