"""Validated settings: defaults < TOML file < `KOWALSKI_*` environment < explicit overrides.

This module is the one source of truth for defaults. Every layer (CLI flags, the Python
API, the node) builds a `Settings` through `load_settings` and reads values from it, so a
default changes in exactly one place.

Environment variables map onto keys with a double underscore between section and key:
`KOWALSKI_RLM__MAX_ITERATIONS=5` sets `rlm.max_iterations`. Two variables are special and
have no section: `KOWALSKI_CONFIG` (path of the TOML file) and `KOWALSKI_HOME` (default of
`paths.home`). Unknown keys, in the file or the environment, are rejected with a
did-you-mean hint, so a typo never silently falls back to a default; so is a variable
like `KOWALSKI_RLM_MAX_ITERATIONS` with a single underscore after the section.

Some defaults depend on the root backend (`BACKEND_DEFAULTS`: the embedded CPU model gets
shorter turns and a shorter time budget); they apply only to keys no layer set.
"""

from __future__ import annotations

import difflib
import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from kowalski_node.errors import ConfigError

ENV_PREFIX = "KOWALSKI_"
ENV_CONFIG = "KOWALSKI_CONFIG"
ENV_HOME = "KOWALSKI_HOME"
CONFIG_FILENAME = "config.toml"

DEFAULT_OLLAMA_HOST = "http://127.0.0.1:11434"
DEFAULT_OPENAI_BASE_URL = "http://127.0.0.1:8080/v1"
DEFAULT_API_PORT = 7471
DEFAULT_P2P_PORT = 7470
DEFAULT_MAX_BODY_BYTES = 256 * 1024 * 1024

# Defaults that depend on the root backend (`llm.backend`). They fill only keys that no
# layer set. The embedded 135M model decodes about 20-30 tokens/s on a laptop CPU, so the
# general defaults (1024-token turns, 20 turns, 10 minutes) kept `kowalski-node run` busy
# for many minutes; with these a run ends within about two minutes (the time budget, then
# one final-answer turn bounded by a 30 s grace period).
_EMBEDDED_CPU_DEFAULTS: dict[str, Any] = {
    "llm.max_tokens": 256,
    "llm.sub_max_tokens": 256,
    "rlm.max_iterations": 6,
    "rlm.time_budget_s": 90.0,
    # A few turns of 20,000-character outputs (the rlms default) overflow a small model's
    # window; 2,000 keep six turns inside the 8,192 tokens a llama.cpp slot holds.
    "rlm.output_limit_chars": 2000,
    # A 0.5B model answers before looking (FINAL(1000) to a CSV sum, turn 1).
    "rlm.answer_after_code": True,
}
# llamacpp runs the same embedded models on the same CPU (faster, but still a laptop CPU).
# llamacpp runs the embedded code model by default: Qwen2.5-Coder-0.5B-Instruct answered
# the demo task right (34 ERROR lines counted, docs/rlm.md), where SmolLM2-135M writes no
# usable RLM code. SmolLM2 stays the tiny option (`--model smollm2-135m-instruct`) and the
# builtin engine's default.
BACKEND_DEFAULTS: dict[str, dict[str, Any]] = {
    "builtin": dict(_EMBEDDED_CPU_DEFAULTS),
    # llama.cpp continues a trailing assistant message, which `rlm.code_prefill` needs.
    "llamacpp": {
        **_EMBEDDED_CPU_DEFAULTS,
        "llm.model": "qwen2.5-coder-0.5b-instruct",
        "rlm.code_prefill": True,
    },
}


class _Section(BaseModel):
    """Strict base: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ApiSettings(_Section):
    """The node's local HTTP API (task submission, dashboard)."""

    host: str = "127.0.0.1"
    port: int = Field(default=DEFAULT_API_PORT, ge=0, le=65535)
    # Bearer token the HTTP API requires; None means loopback clients need none.
    token: str | None = None
    # Largest request body accepted (a task's JSON, context included). Bodies above
    # 1 MiB are streamed to a temp file in the data dir, not held in memory.
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, ge=1024)


class NodeSettings(_Section):
    """Mesh node identity and networking."""

    # Where the node keeps its identity, cluster key and task store (default: paths.home/node).
    data_dir: Path | None = None
    listen: list[str] = Field(default_factory=lambda: [f"/ip4/0.0.0.0/tcp/{DEFAULT_P2P_PORT}"])
    bootstrap: list[str] = Field(default_factory=list)
    api: ApiSettings = Field(default_factory=ApiSettings)
    # Timing profile for failure detection: "lan" (sub-second) or "wan" (tolerant).
    profile: Literal["lan", "wan"] = "lan"


class RlmSettings(_Section):
    """Limits of the RLM loop."""

    max_iterations: int = Field(default=20, gt=0)
    max_depth: int = Field(default=1, ge=1)
    block_timeout_s: float = Field(default=30.0, gt=0)
    time_budget_s: float = Field(default=600.0, gt=0)
    # Total tokens (in + out, all calls of the task); None means unlimited.
    token_budget: int | None = Field(default=None, gt=0)
    max_errors: int = Field(default=5, gt=0)
    # Printed output of one block the model sees (20,000 as in the reference rlms).
    output_limit_chars: int = Field(default=20_000, gt=0)
    sub_concurrency: int = Field(default=8, gt=0)
    # A custom root system prompt (rlms' custom_system_prompt); None = the built-in one.
    system_prompt: str | None = None
    # Short worked examples (0-3) after the system prompt.
    worked_examples: int = Field(default=3, ge=0, le=3)
    # Characters of the context shown in the first user turn (0: none).
    context_preview_chars: int = Field(default=400, ge=0)
    # Refuse a FINAL written before any code has read the context.
    answer_after_code: bool = False
    # While no code has read the context, start the root model's reply with an open ```repl
    # fence (needs a backend that continues a trailing assistant message: llamacpp).
    code_prefill: bool = False


class LlmSettings(_Section):
    """Which model answers root turns and which answers `llm_query` sub-calls."""

    # llamacpp | builtin | ollama | openai | scripted:PATH (also `ollama:MODEL`-style sugar).
    # llamacpp (llama.cpp in-process) runs a pulled model whole on this device; builtin
    # (NumPy) is the engine that can run a range of layers.
    backend: str = "llamacpp"
    # None: the backend's default (llamacpp/builtin: the embedded SmolLM2).
    model: str | None = None
    # None: same as `backend` / `model`.
    sub_backend: str | None = None
    sub_model: str | None = None
    # None: $OLLAMA_HOST, else DEFAULT_OLLAMA_HOST.
    ollama_host: str | None = None
    # None: $OPENAI_BASE_URL, else DEFAULT_OPENAI_BASE_URL.
    openai_base_url: str | None = None
    # None: $OPENAI_API_KEY if set, else no Authorization header.
    openai_api_key: str | None = None
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(default=1024, gt=0)
    # Output cap of one `llm_query` sub-call.
    sub_max_tokens: int = Field(default=512, gt=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    request_timeout_s: float = Field(default=300.0, gt=0)
    # Retries (with exponential backoff) of a call whose backend is unreachable.
    retries: int = Field(default=3, ge=0)
    retry_backoff_s: float = Field(default=0.5, ge=0)
    # BLAS threads of the builtin engine (process-wide); 0 = one per core. One is fastest
    # for decoding on small machines, and much faster when other work shares the cores.
    blas_threads: int = Field(default=1, ge=0)
    # llama.cpp threads; 0 = the usable cores minus one, at least 1 (oversubscribed threads
    # spin: decode fell below 1 tok/s with 2 threads on a busy 2-core machine).
    llamacpp_threads: int = Field(default=0, ge=0)
    # llama.cpp context (tokens), shared by its slots.
    llamacpp_context_tokens: int = Field(default=16384, ge=256)
    # Requests llama.cpp decodes together (its slots); more wait their turn.
    llamacpp_parallel: int = Field(default=2, ge=1)
    # Prefill threads; 0 = every usable core (prefill comes in short, compute-bound bursts).
    llamacpp_batch_threads: int = Field(default=0, ge=0)
    # How much nicer than the node llama.cpp's threads run, so inference never starves
    # membership probes and lease renewals (0 = same priority).
    llamacpp_nice: int = Field(default=10, ge=0, le=19)
    # Save long system prompts' keys/values under <models>/kv-prefix and restore them in
    # later processes instead of prefilling them again.
    llamacpp_prefix_cache: bool = True

    @field_validator("backend", "sub_backend")
    @classmethod
    def _backend_known(cls, value: str | None) -> str | None:
        # Imported here: the factory imports this module.
        from kowalski_node.llm.factory import parse_backend_spec

        if value is not None:
            try:
                parse_backend_spec(value)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value


class SandboxSettings(_Section):
    """Resource limits for REPL worker processes (enforcement: docs/sandbox.md)."""

    memory_mb: int = Field(default=1024, ge=64)
    cpu_s: float = Field(default=60.0, gt=0)
    max_procs: int = Field(default=64, ge=2)
    file_size_mb: int = Field(default=64, gt=0)
    workdir_mb: int = Field(default=256, gt=0)
    pool_size: int = Field(default=2, gt=0)
    # Limits this node insists on: starting fails when the machine cannot enforce one.
    require: list[str] = Field(default_factory=list)
    # Host paths code may read (read-only); nothing else of the host is visible to it.
    expose_paths: list[str] = Field(default_factory=list)

    @field_validator("expose_paths")
    @classmethod
    def _absolute(cls, value: list[str]) -> list[str]:
        relative = [p for p in value if not p.startswith("/")]
        if relative:
            raise ValueError(f"must be absolute paths, got {relative}")
        return value

    @field_validator("require")
    @classmethod
    def _known_limits(cls, value: list[str]) -> list[str]:
        from kowalski_node.repl.config import LIMIT_NAMES

        unknown = sorted(set(value) - set(LIMIT_NAMES))
        if unknown:
            raise ValueError(f"unknown limit(s) {unknown}; known: {', '.join(LIMIT_NAMES)}")
        return value


class InferenceSettings(_Section):
    """Pipelined inference: one model's layers across peers (docs/inference.md)."""

    # auto: one local stage when the model fits this node's cap, else a pipeline;
    # pipeline: always split over peers; tensor: refused (not implemented).
    sharding: Literal["auto", "pipeline", "tensor"] = "auto"
    # Memory this node gives to model layers (MB); None: the machine's free memory.
    memory_cap_mb: int | None = Field(default=None, gt=0)
    # Headroom each stage keeps (KV cache, activations) when planning layer ranges.
    reserve_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    max_stages: int | None = Field(default=None, gt=0)
    # A stage drops a session's KV cache after this long without activations.
    session_idle_s: float = Field(default=300.0, gt=0)
    # Deadline of one activation hop (a stage that stays silent this long counts as lost).
    stage_timeout_s: float = Field(default=60.0, gt=0)
    max_failovers: int = Field(default=3, ge=0)
    # Replay generated tokens one row at a time after a failover: bitwise the original
    # computation (same greedy text guaranteed), at one decode step's compute per token.
    exact_replay: bool = True


class PathSettings(_Section):
    """Directories; unset ones derive from `home`."""

    home: Path = Field(default_factory=lambda: _default_home())
    models: Path | None = None
    trajectories: Path | None = None

    @model_validator(mode="after")
    def _derive(self) -> PathSettings:
        home = self.home.expanduser()
        object.__setattr__(self, "home", home)
        if self.models is None:
            object.__setattr__(self, "models", home / "models")
        if self.trajectories is None:
            object.__setattr__(self, "trajectories", home / "trajectories")
        return self

    @property
    def models_dir(self) -> Path:
        return self.models if self.models is not None else self.home / "models"

    @property
    def trajectories_dir(self) -> Path:
        return self.trajectories if self.trajectories is not None else self.home / "trajectories"


class Settings(_Section):
    """Everything configurable, grouped as in config.toml."""

    node: NodeSettings = Field(default_factory=NodeSettings)
    rlm: RlmSettings = Field(default_factory=RlmSettings)
    llm: LlmSettings = Field(default_factory=LlmSettings)
    sandbox: SandboxSettings = Field(default_factory=SandboxSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    paths: PathSettings = Field(default_factory=PathSettings)

    @model_validator(mode="after")
    def _backend_defaults(self) -> Settings:
        """Fill the root backend's own defaults (BACKEND_DEFAULTS) into keys nobody set.

        They stay "unset" for pydantic, so `with_overrides` choosing another backend
        recomputes them instead of carrying the old backend's values along.
        """
        from kowalski_node.llm.factory import parse_backend_spec

        defaults = BACKEND_DEFAULTS.get(parse_backend_spec(self.llm.backend).kind, {})
        for dotted, value in defaults.items():
            section_name, key = dotted.split(".")
            section = getattr(self, section_name)
            if key in section.model_fields_set:
                continue
            copy = section.model_copy()  # never mutate a section object the caller passed in
            object.__setattr__(copy, key, value)
            object.__setattr__(self, section_name, copy)
        return self

    def explicit_keys(self) -> set[str]:
        """Dotted keys some layer set (file, environment, override), as opposed to defaults."""
        out: set[str] = set()

        def walk(model: BaseModel, prefix: str) -> None:
            for name in model.model_fields_set:
                value = getattr(model, name)
                if isinstance(value, BaseModel):
                    walk(value, f"{prefix}{name}.")
                else:
                    out.add(prefix + name)

        walk(self, "")
        return out

    @property
    def node_data_dir(self) -> Path:
        return self.node.data_dir if self.node.data_dir is not None else self.paths.home / "node"

    def with_overrides(self, overrides: Mapping[str, Any]) -> Settings:
        """A copy with dotted-key overrides applied and validated (`{"rlm.max_iterations": 5}`).

        Values nobody set stay defaults, so they follow the new settings (a new `paths.home`
        moves the derived directories, a new backend brings its own defaults).
        """
        data = self.model_dump(mode="python", exclude_unset=True)
        sources: dict[str, str] = {}
        for key, value in overrides.items():
            _set_dotted(data, key, value, Settings, source="override", sources=sources)
        return _validate(data, sources)


def _default_home() -> Path:
    env = os.environ.get(ENV_HOME)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kowalski-node"


def default_config_path(env: Mapping[str, str] | None = None) -> Path:
    """`$KOWALSKI_HOME/config.toml` (it may not exist)."""
    env = os.environ if env is None else env
    home = env.get(ENV_HOME)
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "kowalski-node"
    return base / CONFIG_FILENAME


def find_config_file(
    explicit: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Path | None:
    """The TOML file to read: explicit > $KOWALSKI_CONFIG > $KOWALSKI_HOME/config.toml if present.

    An explicitly named file that does not exist is an error; the default one is optional.
    """
    env = os.environ if env is None else env
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    named = env.get(ENV_CONFIG)
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file {path} (from {ENV_CONFIG}) does not exist")
        return path
    default = default_config_path(env)
    return default if default.is_file() else None


def load_settings(
    config_path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build validated settings: defaults < file < environment < `overrides` (dotted keys).

    Raises `ConfigError` naming the key (and where its value came from) on any bad value.
    """
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    sources: dict[str, str] = {}
    path = find_config_file(config_path, env)
    if path is not None:
        try:
            file_data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        _merge_file(data, file_data, Settings, prefix="", source=str(path), sources=sources)
    if "home" not in data.get("paths", {}):
        # Resolved from `env`, not os.environ, so an explicit env mapping is hermetic.
        if env.get(ENV_HOME):
            _set_dotted(
                data, "paths.home", env[ENV_HOME], Settings, source=ENV_HOME, sources=sources
            )
        else:
            data.setdefault("paths", {})["home"] = Path.home() / ".cache" / "kowalski-node"
    for name, value in sorted(env.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        if "__" not in name:
            _check_single_underscore(name)
            continue
        dotted = name[len(ENV_PREFIX) :].lower().replace("__", ".")
        _set_dotted(data, dotted, _env_value(value), Settings, source=name, sources=sources)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        _set_dotted(data, key, value, Settings, source="override", sources=sources)
    return _validate(data, sources)


def _check_single_underscore(name: str) -> None:
    """`KOWALSKI_RLM_MAX_ITERATIONS` is a typo of `KOWALSKI_RLM__MAX_ITERATIONS`: say so.

    Only names that would be a real key with `__` after the section are refused; other
    `KOWALSKI_*` variables (KOWALSKI_HOME, tool-specific ones) are left alone.
    """
    rest = name[len(ENV_PREFIX) :].lower()
    for section_name in Settings.model_fields:
        section = _section_model(Settings, section_name)
        prefix = section_name + "_"
        if section is None or not rest.startswith(prefix):
            continue
        key = rest[len(prefix) :]
        if key in section.model_fields:
            fixed = f"{ENV_PREFIX}{section_name.upper()}__{key.upper()}"
            raise ConfigError(
                f"{section_name}.{key}: environment variable {name} is not read; settings use "
                f"a double underscore between section and key: {fixed}"
            )


def _validate(data: dict[str, Any], sources: Mapping[str, str]) -> Settings:
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, sources)) from None


def _format_errors(exc: ValidationError, sources: Mapping[str, str]) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"])
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        lines.append(f"{key}: {msg}{_source_note(key, sources)}")
    return "invalid configuration: " + "; ".join(lines) if len(lines) > 1 else lines[0]


def _source_note(key: str, sources: Mapping[str, str]) -> str:
    src = sources.get(key)
    return f" (from {src})" if src else ""


def _env_value(raw: str) -> Any:
    """JSON lists/objects are parsed; everything else stays a string for pydantic to coerce."""
    text = raw.strip()
    if text.startswith(("[", "{")):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return raw
    return raw


def _section_model(model: type[BaseModel], key: str) -> type[BaseModel] | None:
    """The nested model type of field `key`, if it is a section."""
    field = model.model_fields[key]
    ann = field.annotation
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    return None


def _is_list_field(model: type[BaseModel], key: str) -> bool:
    ann = model.model_fields[key].annotation
    return get_origin(ann) is list or any(get_origin(a) is list for a in get_args(ann))


def _unknown_key(model: type[BaseModel], prefix: str, key: str, source: str) -> ConfigError:
    known = sorted(model.model_fields)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(known)}"
    return ConfigError(f"{prefix}{key}: unknown key (from {source}){hint}")


def _set_dotted(
    data: dict[str, Any],
    dotted: str,
    value: Any,
    model: type[BaseModel],
    *,
    source: str,
    sources: dict[str, str],
) -> None:
    parts = [p for p in dotted.split(".") if p]
    if not parts:
        raise ConfigError(f"empty configuration key (from {source})")
    node = data
    current: type[BaseModel] = model
    prefix = ""
    for i, part in enumerate(parts):
        if part not in current.model_fields:
            raise _unknown_key(current, prefix, part, source)
        sub = _section_model(current, part)
        last = i == len(parts) - 1
        if last:
            if sub is not None and not isinstance(value, Mapping):
                raise ConfigError(f"{prefix}{part}: is a section, not a value (from {source})")
            if isinstance(value, str) and _is_list_field(current, part):
                value = [item.strip() for item in value.split(",") if item.strip()]
            node[part] = value
            sources[prefix + part] = source
            return
        if sub is None:
            raise ConfigError(f"{prefix}{part}: is a value, not a section (from {source})")
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
        current = sub
        prefix = f"{prefix}{part}."


def _merge_file(
    data: dict[str, Any],
    table: Mapping[str, Any],
    model: type[BaseModel],
    *,
    prefix: str,
    source: str,
    sources: dict[str, str],
) -> None:
    for key, value in table.items():
        if key not in model.model_fields:
            raise _unknown_key(model, prefix, key, source)
        sub = _section_model(model, key)
        if sub is not None and isinstance(value, Mapping):
            child = data.setdefault(key, {})
            _merge_file(child, value, sub, prefix=f"{prefix}{key}.", source=source, sources=sources)
        else:
            data[key] = value
            sources[prefix + key] = source


def dump_toml(settings: Settings) -> str:
    """Render settings as TOML (for `config show`-style output and docs); None values omitted."""
    out: list[str] = []

    def emit(table: Mapping[str, Any], name: str) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and v is not None}
        if scalars:
            out.append(f"[{name}]")
            for k, v in scalars.items():
                out.append(f"{k} = {_toml_value(v)}")
            out.append("")
        for k, v in table.items():
            if isinstance(v, dict):
                emit(v, f"{name}.{k}")

    for section, table in settings.model_dump(mode="json").items():
        emit(table, section)
    return "\n".join(out)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))
