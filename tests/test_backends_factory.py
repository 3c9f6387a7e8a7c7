"""Backend specs and the factory: kinds, sugar, root/sub split, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kowalski_node.config import Settings, load_settings
from kowalski_node.errors import ConfigError
from kowalski_node.llm.base import LlmBackend
from kowalski_node.llm.builtin.backend import BuiltinBackend
from kowalski_node.llm.factory import BackendSpec, make_backend, make_backends, parse_backend_spec
from kowalski_node.llm.ollama_backend import OllamaBackend
from kowalski_node.llm.openai_backend import OpenAIBackend
from kowalski_node.llm.scripted import ScriptedBackend


def settings(tmp_path: Path, **overrides: object) -> Settings:
    return load_settings(env={}, overrides={"paths.home": tmp_path, **overrides})


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("builtin", BackendSpec("builtin")),
        ("ollama", BackendSpec("ollama")),
        ("OLLAMA:llama3.2:3b", BackendSpec("ollama", "llama3.2:3b")),
        ("openai:gpt-4o-mini", BackendSpec("openai", "gpt-4o-mini")),
        ("builtin:smollm2", BackendSpec("builtin", "smollm2")),
        ("scripted:/tmp/x.json", BackendSpec("scripted", "/tmp/x.json")),
    ],
)
def test_parse_specs(spec: str, expected: BackendSpec) -> None:
    parsed = parse_backend_spec(spec)
    assert parsed == expected
    assert parsed.model == (None if parsed.kind == "scripted" else parsed.arg)


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("", "empty backend spec"),
        ("llama.cpp", "unknown backend 'llama.cpp'"),
        ("scripted", r"needs a script file: scripted:PATH"),
        ("ollama:", "empty argument"),
    ],
)
def test_bad_specs(spec: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        parse_backend_spec(spec)


def test_make_each_kind(tmp_path: Path) -> None:
    script = tmp_path / "s.json"
    script.write_text(json.dumps({"responses": ["FINAL(1)"]}), encoding="utf-8")
    s = settings(
        tmp_path,
        **{
            "llm.ollama_host": "127.0.0.1:1",
            "llm.openai_base_url": "127.0.0.1:2",
            "llm.openai_api_key": "k",
        },
    )
    builtin = make_backend("builtin", s)
    assert isinstance(builtin, BuiltinBackend) and builtin.models_dir == tmp_path / "models"
    ollama = make_backend("ollama:qwen", s)
    assert isinstance(ollama, OllamaBackend)
    assert (ollama.host, ollama.default_model) == ("http://127.0.0.1:1", "qwen")
    openai = make_backend("openai", s, model="m")
    assert isinstance(openai, OpenAIBackend)
    assert (openai.base_url, openai.default_model, openai.api_key) == (
        "http://127.0.0.1:2/v1",
        "m",
        "k",
    )
    scripted = make_backend(f"scripted:{script}", s)
    assert isinstance(scripted, ScriptedBackend)
    for backend in (builtin, ollama, openai, scripted):
        assert isinstance(backend, LlmBackend)
    with pytest.raises(ConfigError, match="no script file"):
        make_backend(f"scripted:{tmp_path / 'missing.json'}", s)


def test_root_and_sub_share_one_backend_by_default(tmp_path: Path) -> None:
    b = make_backends(settings(tmp_path, **{"llm.backend": "ollama:big"}))
    assert b.shared and (b.root_model, b.sub_model) == ("big", "big")
    b = make_backends(settings(tmp_path, **{"llm.backend": "ollama:big", "llm.sub_model": "small"}))
    assert b.shared and (b.root_model, b.sub_model) == ("big", "small")


def test_sub_backend_can_differ(tmp_path: Path) -> None:
    b = make_backends(
        settings(
            tmp_path,
            **{"llm.backend": "ollama", "llm.model": "big", "llm.sub_backend": "openai:tiny"},
        )
    )
    assert not b.shared
    assert isinstance(b.root, OllamaBackend) and isinstance(b.sub, OpenAIBackend)
    assert (b.root_model, b.sub_model) == ("big", "tiny")
    assert b.sub_spec == BackendSpec("openai", "tiny")
    # a different kind does not inherit the root's model name
    b = make_backends(
        settings(tmp_path, **{"llm.backend": "ollama:big", "llm.sub_backend": "builtin"})
    )
    assert b.sub_model is None and isinstance(b.sub, BuiltinBackend)


async def test_backends_aclose_closes_each_once(tmp_path: Path) -> None:
    b = make_backends(
        settings(tmp_path, **{"llm.backend": "ollama:x", "llm.sub_backend": "openai:y"})
    )
    closed: list[str] = []

    async def mark_root() -> None:
        closed.append("root")

    async def mark_sub() -> None:
        closed.append("sub")

    b.root.aclose = mark_root  # type: ignore[method-assign]
    b.sub.aclose = mark_sub  # type: ignore[method-assign]
    await b.aclose()
    assert closed == ["root", "sub"]
