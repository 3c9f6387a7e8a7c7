"""Settings: precedence (overrides > env > file > defaults) and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from kowalski_node.config import (
    DEFAULT_API_PORT,
    Settings,
    dump_toml,
    find_config_file,
    load_settings,
)
from kowalski_node.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_file_or_env(tmp_path: Path) -> None:
    s = load_settings(env={"KOWALSKI_HOME": str(tmp_path)})
    assert s.rlm.max_iterations == 6  # the embedded (llamacpp) backend's own default
    # llamacpp runs the embedded code model unless a layer names another one.
    assert s.llm.backend == "llamacpp" and s.llm.model == "qwen2.5-coder-0.5b-instruct"
    assert "llm.model" not in s.explicit_keys()
    tiny = load_settings(
        env={"KOWALSKI_HOME": str(tmp_path), "KOWALSKI_LLM__MODEL": "smollm2-135m-instruct"}
    )
    assert tiny.llm.model == "smollm2-135m-instruct"
    assert s.node.api.port == DEFAULT_API_PORT
    assert s.paths.home == tmp_path
    assert s.paths.models_dir == tmp_path / "models"
    assert s.paths.trajectories_dir == tmp_path / "trajectories"
    assert s.node_data_dir == tmp_path / "node"


def test_env_beats_file_beats_defaults(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "k.toml",
        """
[rlm]
max_iterations = 7
max_depth = 2
[llm]
backend = "ollama"
model = "llama3.2"
[node.api]
port = 9000
""",
    )
    env = {
        "KOWALSKI_CONFIG": str(cfg),
        "KOWALSKI_HOME": str(tmp_path),
        "KOWALSKI_RLM__MAX_ITERATIONS": "5",
        "KOWALSKI_NODE__API__TOKEN": "secret",
        "KOWALSKI_NODE__BOOTSTRAP": "/ip4/127.0.0.1/tcp/1, /ip4/127.0.0.1/tcp/2",
        "UNRELATED": "x",
    }
    s = load_settings(env=env)
    assert s.rlm.max_iterations == 5  # env over file
    assert s.rlm.max_depth == 2  # file over default
    assert s.rlm.block_timeout_s == 30.0  # default
    assert (s.llm.backend, s.llm.model) == ("ollama", "llama3.2")
    assert s.node.api.port == 9000 and s.node.api.token == "secret"
    assert s.node.bootstrap == ["/ip4/127.0.0.1/tcp/1", "/ip4/127.0.0.1/tcp/2"]
    # explicit overrides (CLI flags, builder) beat the environment; None means "not given"
    s2 = load_settings(env=env, overrides={"rlm.max_iterations": 3, "llm.model": None})
    assert s2.rlm.max_iterations == 3 and s2.llm.model == "llama3.2"


def test_default_file_in_home_is_read_and_explicit_path_wins(tmp_path: Path) -> None:
    write(tmp_path / "config.toml", "[rlm]\nmax_errors = 2\n")
    other = write(tmp_path / "other.toml", "[rlm]\nmax_errors = 3\n")
    env = {"KOWALSKI_HOME": str(tmp_path)}
    assert find_config_file(env=env) == tmp_path / "config.toml"
    assert load_settings(env=env).rlm.max_errors == 2
    assert load_settings(other, env=env).rlm.max_errors == 3
    assert load_settings(env={**env, "KOWALSKI_CONFIG": str(other)}).rlm.max_errors == 3


def test_json_list_env_value(tmp_path: Path) -> None:
    s = load_settings(
        env={"KOWALSKI_HOME": str(tmp_path), "KOWALSKI_NODE__LISTEN": '["/ip4/127.0.0.1/tcp/5"]'}
    )
    assert s.node.listen == ["/ip4/127.0.0.1/tcp/5"]


@pytest.mark.parametrize(
    ("env", "pattern"),
    [
        (
            {"KOWALSKI_RLM__MAX_ITERATIONS": "0"},
            r"^rlm\.max_iterations: Input should be greater than 0 \(from KOWALSKI_RLM__MAX_ITERATIONS\)$",
        ),
        (
            {"KOWALSKI_RLM__MAX_ITERATIONS": "many"},
            r"rlm\.max_iterations: Input should be a valid integer",
        ),
        (
            {"KOWALSKI_RLM__MAX_ITERATONS": "4"},
            r"rlm\.max_iteratons: unknown key \(from KOWALSKI_RLM__MAX_ITERATONS\); did you mean rlm\.max_iterations\?",
        ),
        ({"KOWALSKI_RLMX__A": "4"}, r"rlmx: unknown key"),
        ({"KOWALSKI_LLM__BACKEND": "gpt"}, r"llm\.backend: unknown backend 'gpt'"),
        (
            {"KOWALSKI_LLM__SUB_BACKEND": "scripted"},
            r"llm\.sub_backend: backend 'scripted' needs a script file",
        ),
        (
            {"KOWALSKI_NODE__API__PORT": "70000"},
            r"node\.api\.port: Input should be less than or equal to 65535",
        ),
        ({"KOWALSKI_NODE__PROFILE": "moon"}, r"node\.profile: Input should be 'lan' or 'wan'"),
        ({"KOWALSKI_RLM": "5"}, None),  # no "__": not a settings variable, ignored
        (
            {"KOWALSKI_SANDBOX__MEMORY_MB": "-1"},
            r"sandbox\.memory_mb: Input should be greater than or equal to 64",
        ),
        ({"KOWALSKI_RLM__TOKEN_BUDGET": "0"}, r"rlm\.token_budget: Input should be greater than 0"),
        (
            {"KOWALSKI_SANDBOX__REQUIRE": "network,bogus"},
            r"sandbox\.require: unknown limit\(s\) \['bogus'\]",
        ),
        ({"KOWALSKI_NODE__API": "x"}, r"node\.api: is a section, not a value"),
        (
            {"KOWALSKI_SANDBOX__EXPOSE_PATHS": "/srv/data,relative/dir"},
            r"sandbox\.expose_paths: .*must be absolute paths, got \['relative/dir'\]",
        ),
    ],
)
def test_bad_env_values_name_the_key(
    tmp_path: Path, env: dict[str, str], pattern: str | None
) -> None:
    full = {"KOWALSKI_HOME": str(tmp_path), **env}
    if pattern is None:
        load_settings(env=full)
        return
    with pytest.raises(ConfigError, match=pattern):
        load_settings(env=full)


def test_bad_file_values_name_key_and_file(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.toml", "[rlm]\nblock_timeout_s = -2\n")
    with pytest.raises(
        ConfigError, match=rf"rlm\.block_timeout_s: Input should be greater than 0 \(from {cfg}\)"
    ):
        load_settings(cfg, env={})
    typo = write(tmp_path / "t.toml", "[llm]\nmodle = 'x'\n")
    with pytest.raises(ConfigError, match=r"llm\.modle: unknown key .*did you mean llm\.model\?"):
        load_settings(typo, env={})
    broken = write(tmp_path / "b.toml", "[rlm\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(broken, env={})
    many = write(tmp_path / "m.toml", "[rlm]\nmax_errors = 0\nmax_depth = -1\n")
    with pytest.raises(
        ConfigError, match=r"^invalid configuration: rlm\.max_depth: .*; rlm\.max_errors: "
    ):
        load_settings(many, env={})


def test_missing_named_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", env={})
    with pytest.raises(ConfigError, match="from KOWALSKI_CONFIG"):
        load_settings(env={"KOWALSKI_CONFIG": str(tmp_path / "nope.toml")})


def test_with_overrides_validates(tmp_path: Path) -> None:
    s = load_settings(env={"KOWALSKI_HOME": str(tmp_path)})
    s2 = s.with_overrides({"rlm.max_iterations": 3, "llm.backend": "ollama:qwen"})
    assert s2.rlm.max_iterations == 3 and s2.llm.backend == "ollama:qwen"
    assert s.rlm.max_iterations == 6  # original untouched
    with pytest.raises(
        ConfigError, match=r"rlm\.max_iterations: Input should be greater than 0 \(from override\)"
    ):
        s.with_overrides({"rlm.max_iterations": -1})
    with pytest.raises(ConfigError, match="unknown key"):
        s.with_overrides({"rlm.nope": 1})


def test_dump_toml_round_trips(tmp_path: Path) -> None:
    s = load_settings(env={"KOWALSKI_HOME": str(tmp_path), "KOWALSKI_NODE__API__TOKEN": "t"})
    cfg = write(tmp_path / "dump.toml", dump_toml(s))
    again = load_settings(cfg, env={})
    assert again == s
    assert isinstance(again, Settings)


def test_builtin_backend_brings_short_defaults_that_any_layer_overrides(tmp_path: Path) -> None:
    home = {"KOWALSKI_HOME": str(tmp_path)}
    s = load_settings(env=home)
    assert (s.llm.max_tokens, s.llm.sub_max_tokens) == (256, 256)
    assert (s.rlm.max_iterations, s.rlm.time_budget_s) == (6, 90.0)
    assert "rlm.max_iterations" not in s.explicit_keys()
    # Another backend keeps the general defaults.
    other = load_settings(env={**home, "KOWALSKI_LLM__BACKEND": "ollama:llama3.2"})
    assert (other.llm.max_tokens, other.rlm.max_iterations, other.rlm.time_budget_s) == (
        1024,
        20,
        600.0,
    )
    # Every layer beats them: file, environment, override.
    cfg = write(tmp_path / "k.toml", "[rlm]\nmax_iterations = 9\n")
    assert load_settings(cfg, env=home).rlm.max_iterations == 9
    env = {**home, "KOWALSKI_LLM__MAX_TOKENS": "700"}
    assert load_settings(env=env).llm.max_tokens == 700
    flagged = load_settings(env=home, overrides={"rlm.time_budget_s": 30})
    assert flagged.rlm.time_budget_s == 30 and flagged.rlm.max_iterations == 6
    # Switching backend later recomputes them; explicit values travel along.
    switched = flagged.with_overrides({"llm.backend": "openai"})
    assert (switched.rlm.max_iterations, switched.llm.max_tokens) == (20, 1024)
    assert switched.rlm.time_budget_s == 30
    back = switched.with_overrides({"llm.backend": "builtin"})
    assert back.rlm.max_iterations == 6 and back.rlm.time_budget_s == 30


def test_backend_defaults_do_not_touch_a_section_passed_in() -> None:
    from kowalski_node.config import RlmSettings

    mine = RlmSettings(max_depth=2)
    s = Settings(rlm=mine)
    assert s.rlm.max_iterations == 6 and s.rlm.max_depth == 2
    assert mine.max_iterations == 20  # the caller's object is unchanged


def test_single_underscore_env_variable_is_refused_with_the_right_spelling() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"KOWALSKI_RLM_MAX_ITERATIONS": "3"})
    message = str(caught.value)
    assert message.startswith("rlm.max_iterations:")
    assert "KOWALSKI_RLM__MAX_ITERATIONS" in message
    # Variables that are not misspelt keys are left alone.
    s = load_settings(env={"KOWALSKI_API_TOKEN": "x", "KOWALSKI_SKIP_MODEL": "1"})
    assert s.node.api.token is None


def test_with_overrides_of_home_moves_the_derived_directories(tmp_path: Path) -> None:
    s = load_settings(env={"KOWALSKI_HOME": str(tmp_path / "a")})
    moved = s.with_overrides({"paths.home": tmp_path / "b"})
    assert moved.paths.models_dir == tmp_path / "b" / "models"
    assert moved.paths.trajectories_dir == tmp_path / "b" / "trajectories"
    pinned = load_settings(
        env={"KOWALSKI_HOME": str(tmp_path / "a"), "KOWALSKI_PATHS__MODELS": str(tmp_path / "m")}
    ).with_overrides({"paths.home": tmp_path / "b"})
    assert pinned.paths.models_dir == tmp_path / "m"
