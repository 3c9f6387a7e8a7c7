"""ScriptedBackend: the `scripted:PATH` replay format, sequence-based answers, clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from kowalski_node.errors import BackendUnavailable, ConfigError, LlmError, ScriptExhausted
from kowalski_node.llm.base import ChatMessage, LlmBackend, LlmRequest, Purpose
from kowalski_node.llm.scripted import ScriptedBackend

DATA = Path(__file__).parent / "data"


def request(seq: int, purpose: Purpose = "root", task: str = "t1") -> LlmRequest:
    return LlmRequest(
        messages=(ChatMessage("user", "x" * 40),),
        task_id=task,
        purpose=purpose,
        sequence=seq,
    )


def write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "script.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_it_is_an_llm_backend() -> None:
    backend = ScriptedBackend(["a"])
    assert isinstance(backend, LlmBackend) and backend.name == "scripted"


async def test_answers_by_sequence_not_by_call_count() -> None:
    backend = ScriptedBackend(["r0", "r1", "r2"], ["s0", "s1"])
    # Out of order, repeated, and two tasks interleaved: the sequence alone decides.
    assert (await backend.complete(request(2))).text == "r2"
    assert (await backend.complete(request(0, task="other"))).text == "r0"
    assert (await backend.complete(request(0))).text == "r0"
    assert (await backend.complete(request(2))).text == "r2"
    assert (await backend.complete(request(1, "sub"))).text == "s1"
    response = await backend.complete(request(1))
    assert (response.backend, response.model, response.tokens_in, response.tokens_out) == (
        "scripted",
        "scripted",
        10,
        1,
    )


async def test_exhausted_lists_fail_clearly() -> None:
    backend = ScriptedBackend(["only"], ["one"])
    with pytest.raises(
        ScriptExhausted,
        match=r"task t1 asked for root turn #2 \(sequence 1\).*'responses' has only 1 entry",
    ):
        await backend.complete(request(1))
    with pytest.raises(ScriptExhausted, match=r"sub-call #4 .*'sub_responses' has only 1 entry"):
        await backend.complete(request(3, "sub"))
    with pytest.raises(ScriptExhausted, match="fold call #1"):
        await backend.complete(request(0, "fold"))


async def test_entry_objects_errors_and_token_overrides() -> None:
    backend = ScriptedBackend(
        [
            {"text": "hi", "tokens_out": 77},
            {"error": "overloaded"},
            {"error": "down", "unavailable": True},
        ]
    )
    assert (await backend.complete(request(0))).tokens_out == 77
    with pytest.raises(LlmError, match="overloaded") as caught:
        await backend.complete(request(1))
    assert not isinstance(caught.value, BackendUnavailable)
    with pytest.raises(
        BackendUnavailable, match="scripted backend at <inline script> is unreachable: down"
    ):
        await backend.complete(request(2))


def test_latency_is_simulated() -> None:
    clock = trio.testing.MockClock(autojump_threshold=0)

    async def main() -> tuple[float, float]:
        backend = ScriptedBackend(
            ["a", {"text": "b", "latency_ms": 5}], ["s"], latency_ms={"root": 250, "sub": 40}
        )
        start = trio.current_time()
        await backend.complete(request(0))
        after_root = trio.current_time()
        await backend.complete(request(0, "sub"))
        return after_root - start, trio.current_time() - after_root

    root_s, sub_s = trio.run(main, clock=clock)
    assert root_s == pytest.approx(0.25) and sub_s == pytest.approx(0.04)


async def test_stream_yields_the_same_text() -> None:
    backend = ScriptedBackend(["one two three"])
    pieces = [p async for p in backend.stream(request(0))]
    assert "".join(pieces) == "one two three" and len(pieces) == 3
    assert await backend.list_models() == ["scripted"]


def test_file_round_trip(tmp_path: Path) -> None:
    original = json.loads((DATA / "rlm_sales.json").read_text())
    backend = ScriptedBackend.from_file(DATA / "rlm_sales.json")
    assert len(backend) == len(original["responses"])
    again = ScriptedBackend.from_dict(json.loads(json.dumps(backend.to_dict())))
    assert again.to_dict() == backend.to_dict()
    assert backend.to_dict()["sub_responses"] == original["sub_responses"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", r"not valid JSON \(line 1"),
        ("[1, 2]", "must be a JSON object"),
        ({"sub_responses": []}, "missing the required 'responses' list"),
        ({"responses": "abc"}, "'responses' must be a list"),
        ({"responses": [], "sub_response": []}, r"unknown key\(s\) sub_response"),
        ({"responses": [3]}, r"responses\[0\] must be a string or an object"),
        ({"responses": [{"text": "a", "error": "b"}]}, "exactly one of 'text' or 'error'"),
        ({"responses": [{"txt": "a"}]}, r"responses\[0\] has unknown key\(s\) txt"),
        ({"responses": [{"text": "a", "tokens_out": -1}]}, "'tokens_out' must be an integer >= 0"),
        ({"responses": [], "latency_ms": -5}, "latency_ms must be a number >= 0"),
        ({"responses": [], "latency_ms": {"rooot": 1}}, r"latency_ms has unknown key\(s\) rooot"),
        ({"responses": [], "model": ""}, "'model' must be a non-empty string"),
    ],
)
def test_invalid_scripts_are_rejected_clearly(tmp_path: Path, content: Any, message: str) -> None:
    path = write(tmp_path, content)
    with pytest.raises(ConfigError, match=message) as caught:
        ScriptedBackend.from_file(path)
    assert "scripted backend" in str(caught.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no script file at"):
        ScriptedBackend.from_file(tmp_path / "nope.json")


def test_factory_builds_it_from_a_spec(tmp_path: Path) -> None:
    from kowalski_node.config import Settings
    from kowalski_node.llm.factory import make_backend

    path = write(tmp_path, {"responses": ["FINAL(1)"], "model": "replay"})
    backend = make_backend(f"scripted:{path}", Settings())
    assert isinstance(backend, ScriptedBackend) and backend.model == "replay"
