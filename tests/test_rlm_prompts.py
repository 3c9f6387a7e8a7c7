"""Prompts carry context metadata only, and outputs are cut before the model sees them."""

from __future__ import annotations

import pytest

from kowalski_node.errors import ConfigError
from kowalski_node.rlm.config import RlmConfig
from kowalski_node.rlm.prompts import (
    context_metadata,
    describe_context,
    first_user_message,
    system_prompt,
    truncate,
)

SECRET = "zebra-7781"


@pytest.mark.parametrize(
    ("context", "kind", "total"),
    [
        (f"line one\n{SECRET}\nline three", "str", 30),
        (f"{SECRET}".encode(), "bytes", 10),
        ([f"{SECRET} a", "bb", "ccc"], "list", 17),
        ({"k1": SECRET, "k2": ["x", "yy"]}, "dict", 17),
        ((SECRET, SECRET), "tuple", 20),
        (12345, "int", 5),
    ],
)
def test_metadata_never_contains_the_context(context: object, kind: str, total: int) -> None:
    meta = context_metadata(context)
    assert meta["type"] == kind and meta["total_length"] == total
    text = first_user_message("What is hidden?", meta) + system_prompt(
        meta, max_output_chars=100, sub_chars=50
    )
    assert SECRET not in text and SECRET not in repr(meta)


def test_chunk_summary_for_lists() -> None:
    meta = context_metadata(["a" * n for n in range(1, 31)])
    chunks = meta["chunks"]
    assert (chunks["count"], chunks["min"], chunks["max"], chunks["lengths_truncated"]) == (
        30,
        1,
        30,
        True,
    )
    assert chunks["lengths"] == list(range(1, 21))
    described = describe_context(meta)
    assert "30 items" in described and "..." in described and "465 total characters" in described


def test_string_metadata_mentions_lines() -> None:
    assert "3 lines" in describe_context(context_metadata("a\nb\nc"))


def test_system_prompt_teaches_the_repl() -> None:
    text = system_prompt(context_metadata("abc"), max_output_chars=4000, sub_chars=8000)
    for needle in (
        "```repl",
        "context",
        "llm_query(",
        "llm_query_batched(",
        "FINAL(",
        "FINAL_VAR(",
        "SHOW_VARS()",
        "4,000",
    ):
        assert needle in text


def test_truncate_keeps_head_and_tail_within_the_limit() -> None:
    text = "HEAD" + "x" * 10_000 + "TAIL"
    cut = truncate(text, 300)
    assert cut.startswith("HEAD") and cut.endswith("TAIL") and "9,708 characters truncated" in cut
    assert len(cut) < 360
    assert truncate("short", 300) == "short"


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_iterations", 0), ("block_timeout_s", 0), ("token_budget", 0), ("time_budget_s", -1),
     ("sub_concurrency", 0), ("temperature", -1.0), ("top_p", 0.0), ("llm_retries", -1)],
)  # fmt: skip
def test_config_rejects_bad_values_naming_the_key(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"rlm.{field}"):
        RlmConfig(**{field: value})  # type: ignore[arg-type]


def test_config_round_trips_and_rejects_unknown_keys() -> None:
    config = RlmConfig(max_iterations=7, sub_model="small")
    assert RlmConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="max_iteration"):
        RlmConfig.from_dict({"max_iteration": 3})


def test_block_output_is_cut_at_20000_characters_by_default_as_in_rlms() -> None:
    from kowalski_node.config import load_settings
    from kowalski_node.rlm.config import RlmConfig
    from kowalski_node.rlm.prompts import truncate

    assert RlmConfig().max_output_chars == 20_000
    assert (
        load_settings(env={}, overrides={"llm.backend": "ollama"}).rlm.output_limit_chars == 20_000
    )
    kept = truncate("x" * 30_000, RlmConfig().max_output_chars)
    assert len(kept) < 20_100 and "10,000 characters truncated" in kept
    # Still a setting; the embedded engines lower it so turns fit a small model's window.
    assert RlmConfig(max_output_chars=500).max_output_chars == 500
    assert (
        load_settings(env={}, overrides={"llm.backend": "llamacpp"}).rlm.output_limit_chars == 2000
    )
