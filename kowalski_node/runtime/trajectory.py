"""JSONL trajectories: one line per step of a task, flushed as it happens.

Flushed line by line so a node that dies mid-task still leaves a readable file.
The records come from the machine's `Trace` effects; the writer only adds a
wall-clock `ts`.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import IO, Any

from kowalski_node.errors import KowalskiError

RECORD_TYPES = frozenset(
    {"task_start", "model_request", "model_response", "model_error", "block", "final_var",
     "limit", "cancelled", "resumed", "replay", "final", "final_refused", "exec_retry",
     "extract_request", "extract_response"}
)  # fmt: skip


class TrajectoryError(KowalskiError):
    """A trajectory file is missing, unreadable or not a trajectory."""


def trajectory_path(directory: str | Path, task_id: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", task_id)[:120] or "task"
    return Path(directory) / f"{safe}.jsonl"


class TrajectoryWriter:
    """Appends records to one task's file; a resumed task appends to the same name."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file: IO[str] | None = self.path.open("a", encoding="utf-8")
        except OSError as exc:
            raise TrajectoryError(
                f"cannot write trajectory {self.path}: {exc.strerror or exc}"
            ) from exc

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        line = json.dumps({**record, "ts": round(time.time(), 6)}, ensure_ascii=False, default=str)
        try:
            self._file.write(line + "\n")
            self._file.flush()
        except OSError:
            # A full disk must not end the task: the trajectory is a record, not the result.
            self.close()

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._file = None


def model_used(path: str | Path | None) -> tuple[str | None, str | None]:
    """(model, backend) of the last model turn recorded in a trajectory file.

    The loop's result does not carry them; the trajectory does, for every turn, as the
    backend reported it (so a default model shows by its real name). (None, None) when
    there is no file or no model turn in it.
    """
    if not path:
        return None, None
    model = backend = None
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if '"model_response"' not in line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("type") == "model_response":
                    model = record.get("model") or model
                    backend = record.get("backend") or backend
    except (OSError, UnicodeDecodeError):
        return None, None
    return model, backend


def read_trajectory(path: str | Path) -> list[dict[str, Any]]:
    """Parse a trajectory file; errors name the file and the line."""
    file = Path(path)
    if not file.exists():
        raise TrajectoryError(f"trajectory file not found: {file}")
    if not file.is_file():
        raise TrajectoryError(f"not a file: {file}")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TrajectoryError(f"cannot read trajectory {file}: {exc}") from exc
    records: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TrajectoryError(f"{file}:{number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or "type" not in record:
            raise TrajectoryError(f"{file}:{number}: not a trajectory record (no 'type' field)")
        records.append(record)
    if not records:
        raise TrajectoryError(f"{file} is empty: no trajectory records")
    return records
