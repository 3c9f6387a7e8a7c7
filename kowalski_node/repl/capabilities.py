"""What the sandbox enforces on this machine, as reported by a real worker (not assumed)."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from typing import Any

from kowalski_node.repl.config import LIMIT_NAMES


@dataclass(frozen=True)
class LimitReport:
    enforced: bool
    how: str


@dataclass(frozen=True)
class SandboxCapabilities:
    """Per limit: enforced or not, and by which mechanism (or why not)."""

    limits: dict[str, LimitReport]
    languages: tuple[str, ...]
    platform: str = field(default_factory=platform.platform)
    worker_uid: int | None = None

    @classmethod
    def from_hello(cls, hello: dict[str, Any]) -> SandboxCapabilities:
        limits: dict[str, LimitReport] = {}
        raw = hello.get("caps") if isinstance(hello.get("caps"), dict) else {}
        assert isinstance(raw, dict)
        for name, entry in raw.items():
            if isinstance(entry, dict):
                limits[str(name)] = LimitReport(
                    bool(entry.get("enforced")), str(entry.get("how", ""))
                )
        for name in LIMIT_NAMES:
            limits.setdefault(name, LimitReport(False, "not reported by the worker"))
        langs = hello.get("langs") if isinstance(hello.get("langs"), list) else ["python"]
        assert isinstance(langs, list)
        uid = hello.get("uid")
        return cls(
            limits, tuple(str(x) for x in langs), worker_uid=uid if isinstance(uid, int) else None
        )

    def missing(self) -> list[str]:
        """The standard limits this machine does not enforce."""
        return [name for name in LIMIT_NAMES if not self.limits[name].enforced]

    @property
    def fully_enforced(self) -> bool:
        return not self.missing()

    def summary(self) -> str:
        lines = [f"sandbox on {self.platform}; languages: {', '.join(self.languages)}"]
        for name in LIMIT_NAMES:
            report = self.limits[name]
            lines.append(f"  {'ok ' if report.enforced else 'NOT'} {name}: {report.how}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "platform": self.platform,
            "languages": list(self.languages),
            "missing": self.missing(),
            "limits": {n: {"enforced": r.enforced, "how": r.how} for n, r in self.limits.items()},
        }
