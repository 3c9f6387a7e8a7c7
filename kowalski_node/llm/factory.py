"""Backend specs (`llamacpp`, `builtin`, `ollama:MODEL`, `scripted:PATH`, ...) to backends.

`llamacpp` (llama.cpp in-process, from the prebuilt `xllamacpp` wheel) is the default for a
pulled model that runs whole on this device; `builtin` (the NumPy engine) is the one that
can run a range of layers, for pipelines across devices. Both read the same pulled GGUFs.

The root model and the sub-call model are configured separately (`llm.backend`/`llm.model`
and `llm.sub_backend`/`llm.sub_model`), so `llm_query` can go to a smaller, faster model.
When both resolve to the same backend, one object serves both (one client, one engine).
Backends are imported lazily: choosing `ollama` never loads numpy weights and vice versa.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

from kowalski_node.errors import ConfigError
from kowalski_node.llm.base import LlmBackend

if TYPE_CHECKING:
    from kowalski_node.config import Settings

BackendKind = Literal["llamacpp", "builtin", "ollama", "openai", "scripted"]
BACKEND_KINDS: tuple[BackendKind, ...] = ("llamacpp", "builtin", "ollama", "openai", "scripted")
# Kinds that run a pulled GGUF in this process (the model must be on disk first).
LOCAL_KINDS: tuple[BackendKind, ...] = ("llamacpp", "builtin")


@dataclass(frozen=True)
class BackendSpec:
    """A parsed spec: the kind, plus its argument (a model name, or the script path)."""

    kind: BackendKind
    arg: str | None = None

    @property
    def model(self) -> str | None:
        return None if self.kind == "scripted" else self.arg

    def __str__(self) -> str:
        return self.kind if self.arg is None else f"{self.kind}:{self.arg}"


def parse_backend_spec(spec: str) -> BackendSpec:
    """`llamacpp`, `builtin`, `ollama`, `openai`, `KIND:MODEL` sugar, or `scripted:PATH`."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(
            f"empty backend spec; expected one of {', '.join(BACKEND_KINDS)} or scripted:PATH"
        )
    kind, sep, arg = spec.strip().partition(":")
    kind = kind.lower()
    if kind not in BACKEND_KINDS:
        raise ConfigError(
            f"unknown backend {spec!r}; expected llamacpp[:MODEL], builtin[:MODEL], "
            "ollama[:MODEL], openai[:MODEL] or scripted:PATH"
        )
    arg = arg.strip()
    if kind == "scripted" and not arg:
        raise ConfigError("backend 'scripted' needs a script file: scripted:PATH")
    if sep and not arg:
        raise ConfigError(f"backend spec {spec!r} has an empty argument after ':'")
    return BackendSpec(cast(BackendKind, kind), arg or None)


def make_backend(
    spec: str | BackendSpec, settings: Settings, *, model: str | None = None
) -> LlmBackend:
    """Build one backend. `model` (else the spec's sugar, else `llm.model`) is its default model."""
    parsed = parse_backend_spec(spec) if isinstance(spec, str) else spec
    chosen = model or parsed.model or settings.llm.model
    llm = settings.llm
    if parsed.kind == "llamacpp":
        from kowalski_node.llm.llamacpp_backend import LlamaCppBackend

        return LlamaCppBackend(
            chosen,
            models_dir=settings.paths.models_dir,
            threads=llm.llamacpp_threads,
            context_tokens=llm.llamacpp_context_tokens,
            parallel=llm.llamacpp_parallel,
            batch_threads=llm.llamacpp_batch_threads,
            nice=llm.llamacpp_nice,
            prefix_cache=llm.llamacpp_prefix_cache,
        )
    if parsed.kind == "builtin":
        from kowalski_node.llm.builtin.backend import BuiltinBackend

        return BuiltinBackend(
            chosen, models_dir=settings.paths.models_dir, blas_threads=llm.blas_threads
        )
    if parsed.kind == "ollama":
        from kowalski_node.llm.ollama_backend import OllamaBackend

        return OllamaBackend(
            host=llm.ollama_host,
            model=chosen,
            connect_timeout_s=llm.connect_timeout_s,
            timeout_s=llm.request_timeout_s,
        )
    if parsed.kind == "openai":
        from kowalski_node.llm.openai_backend import OpenAIBackend

        return OpenAIBackend(
            base_url=llm.openai_base_url,
            model=chosen,
            api_key=llm.openai_api_key,
            connect_timeout_s=llm.connect_timeout_s,
            timeout_s=llm.request_timeout_s,
        )
    return _make_scripted(Path(cast(str, parsed.arg)).expanduser())


def _make_scripted(path: Path) -> LlmBackend:
    from kowalski_node.llm.scripted import ScriptedBackend

    return ScriptedBackend.from_file(path)


@dataclass
class Backends:
    """The backends (and default models) for root turns and for sub-calls."""

    root: LlmBackend
    sub: LlmBackend
    root_model: str | None
    sub_model: str | None
    root_spec: BackendSpec
    sub_spec: BackendSpec

    @property
    def shared(self) -> bool:
        return self.root is self.sub

    async def aclose(self) -> None:
        try:
            await self.root.aclose()
        finally:
            if not self.shared:
                await self.sub.aclose()


def resolve_models(settings: Settings) -> tuple[BackendSpec, str | None, BackendSpec, str | None]:
    """(root spec, root model, sub spec, sub model) after applying sugar and fallbacks."""
    llm = settings.llm
    root_spec = parse_backend_spec(llm.backend)
    root_model = root_spec.model or llm.model
    if llm.sub_backend is None:
        sub_spec = root_spec
        sub_model = llm.sub_model or root_model
    else:
        sub_spec = parse_backend_spec(llm.sub_backend)
        same_kind = sub_spec.kind == root_spec.kind
        sub_model = llm.sub_model or sub_spec.model or (root_model if same_kind else None)
    return root_spec, root_model, sub_spec, sub_model


def make_backends(settings: Settings) -> Backends:
    """Root and sub backends; one shared object when the sub spec names the same backend."""
    root_spec, root_model, sub_spec, sub_model = resolve_models(settings)
    root = make_backend(root_spec, settings, model=root_model)
    same = sub_spec.kind == root_spec.kind and (
        sub_spec.kind != "scripted" or sub_spec.arg == root_spec.arg
    )
    sub = root if same else make_backend(sub_spec, settings, model=sub_model)
    return Backends(root, sub, root_model, sub_model, root_spec, sub_spec)
