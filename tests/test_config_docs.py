"""docs/configuration.md lists every settings key with its env variable."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from kowalski_node.config import Settings

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys: list[str] = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += all_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def test_every_key_is_documented() -> None:
    text = DOC.read_text(encoding="utf-8")
    keys = all_keys(Settings)
    assert len(keys) > 30
    missing = [k for k in keys if f"| `{k}` |" not in text]
    assert not missing, f"undocumented settings keys: {missing}"
    env_missing = [k for k in keys if f"`KOWALSKI_{k.upper().replace('.', '__')}`" not in text]
    assert not env_missing, f"env variable not documented for: {env_missing}"
