"""Pipelined generation in one process over a msgpack-round-trip mesh: tokens equal the
single-process engine's for 1, 2 and 3 stages, a killed stage is replaced by replay, and a
peer without the model fetches its range into the encrypted shard cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from inference_support import StageMesh, registry_model_names, registry_model_path

from kowalski_node.inference import GenerateRequest, PipelineSettings, ShardingUnsupported
from kowalski_node.inference.modelinfo import LeaderModel
from kowalski_node.llm.builtin import Engine, GenerationParams
from tests.engine_fixtures import write_tiny_gguf

PROMPT = [("user", "Write one sentence about the ocean.")]


def engine_tokens(
    path: Path, models_dir: Path, messages: list[tuple[str, str]], n: int
) -> list[int]:
    engine = Engine.load(path, models_dir=models_dir)
    ids = engine.encode_chat(messages)
    run = engine.start(ids, GenerationParams(max_tokens=n))
    while not run.done:
        run.step()
    return list(run.result.token_ids)


def _model_params() -> list[object]:
    """The tiny model in the default run; the others (Qwen2.5-Coder-0.5B, about 70 s of
    this module on 2 cores) under `-m slow`, which keeps the CI suite within its time.
    By default Qwen's forward pass stays covered against llama.cpp's tokens in
    test_engine_qwen2.py; its layer-range pipeline runs here under `-m slow` and in
    bench/pipeline.py."""
    return [
        name if name.startswith("smollm2") else pytest.param(name, marks=pytest.mark.slow)
        for name in registry_model_names()
    ]


@pytest.fixture(scope="module", params=_model_params())
def smollm2(request: pytest.FixtureRequest) -> tuple[Path, Path]:
    """Each registry model in turn (see `_model_params`)."""
    path = registry_model_path(request.param)
    return path, path.parent.parent


def caps_for(model: LeaderModel, stages: int) -> int:
    """A memory cap (MB) per node that forces exactly `stages` stages."""
    total = sum(model.plan_sizes())
    return int(total / stages / 0.9 / (1024 * 1024) * 1.15) + 1


@pytest.mark.model
@pytest.mark.parametrize("n_stages", [1, 2, 3])
def test_pipeline_tokens_equal_single_engine(
    smollm2: tuple[Path, Path], tmp_path: Path, n_stages: int
) -> None:
    path, models_dir = smollm2
    expected = engine_tokens(path, models_dir, PROMPT, 24)
    model = LeaderModel.open(str(path), models_dir)
    mesh = StageMesh(tmp_path)
    cap = caps_for(model, n_stages) if n_stages > 1 else None
    nodes = [mesh.add(f"peer{i}", models_dir, cap_mb=cap) for i in range(n_stages)]

    async def main() -> None:
        result = await nodes[0].generator.generate(
            GenerateRequest(model=str(path), messages=PROMPT, max_tokens=24)
        )
        assert len(result.stages) == n_stages, result.stages
        assert result.token_ids == expected[: len(result.token_ids)]
        assert len(result.token_ids) == len(expected) or result.finish_reason == "stop"
        assert result.token_ids == expected

    trio.run(main)


@pytest.mark.model
def test_killed_stage_is_replaced_and_text_is_unchanged(
    smollm2: tuple[Path, Path], tmp_path: Path
) -> None:
    path, models_dir = smollm2
    expected = engine_tokens(path, models_dir, PROMPT, 20)
    model = LeaderModel.open(str(path), models_dir)
    mesh = StageMesh(tmp_path)
    cap = caps_for(model, 2)  # two survivors can hold the model
    settings = PipelineSettings(sharding="pipeline")
    nodes = [mesh.add(f"peer{i}", models_dir, cap_mb=cap, settings=settings) for i in range(3)]
    forwards: dict[str, int] = {}
    victim: list[str] = []

    def kill_mid_generation(src: str, dst: str, type_: str) -> None:
        if type_ == "act.forward" and dst != "peer0":
            forwards[dst] = forwards.get(dst, 0) + 1
            if forwards[dst] == 8 and not victim:
                victim.append(dst)
                mesh.kill(dst)

    mesh.hooks.append(kill_mid_generation)

    async def main() -> None:
        result = await nodes[0].generator.generate(
            GenerateRequest(model=str(path), messages=PROMPT, max_tokens=20)
        )
        assert victim, "the hook never killed a stage"
        assert result.failovers == 1
        assert result.epochs == 2
        assert victim[0] not in [s["peer"] for s in result.stages]
        assert len(result.replays_s) == 1
        assert result.token_ids == expected

    trio.run(main)


@pytest.mark.model
def test_peer_without_model_fetches_encrypted_shard_and_refetches_tampered(
    smollm2: tuple[Path, Path], tmp_path: Path
) -> None:
    path, models_dir = smollm2
    expected = engine_tokens(path, models_dir, PROMPT, 12)
    mesh = StageMesh(tmp_path)
    settings = PipelineSettings(sharding="pipeline", max_stages=2)
    leader = mesh.add("peer0", models_dir, settings=settings)
    empty = tmp_path / "empty-models"
    empty.mkdir()
    fetcher = mesh.add("peer1", empty, settings=settings)
    request = GenerateRequest(model=str(path), messages=PROMPT, max_tokens=12)

    async def main() -> None:
        result = await leader.generator.generate(request)
        assert [s["peer"] for s in result.stages] == ["peer0", "peer1"] or [
            s["peer"] for s in result.stages
        ] == ["peer1", "peer0"]
        assert result.token_ids == expected
        assert fetcher.stages.stats.fetched_tensors > 0
        files = sorted((tmp_path / "peer1" / "shards").rglob("*.kws"))
        assert files
        assert not list((tmp_path / "peer1" / "blobs").glob("*")), "plaintext blobs left behind"
        head = files[0].read_bytes()[:64]
        assert head.startswith(b"KWS1") and b"NUMPY" not in files[0].read_bytes()[:4096]
        # flip one byte in a tensor file: the stage refuses it, fetches again, still exact
        victim = files[len(files) // 2]
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
        fetcher.stages.parts.clear()
        again = await leader.generator.generate(request)
        assert again.token_ids == expected
        assert fetcher.stages.stats.corrupt_refetches == 1

    trio.run(main)


def test_tensor_sharding_is_refused_naming_pipeline(tmp_path: Path) -> None:
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    mesh = StageMesh(tmp_path)
    node = mesh.add("peer0", tmp_path / "models")

    async def main() -> None:
        with pytest.raises(ShardingUnsupported, match="pipeline"):
            await node.generator.generate(
                GenerateRequest(model=str(gguf), prompt_tokens=[1, 2, 3], sharding="tensor")
            )

    trio.run(main)


@pytest.mark.parametrize("n_stages", [2, 3])
def test_tiny_model_pipeline_equals_engine(tmp_path: Path, n_stages: int) -> None:
    """Runs without the real model: a random 4-layer Llama, forced into n stages."""
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    gguf = write_tiny_gguf(models_dir / "tiny.gguf", n_layers=4)
    engine = Engine.load(gguf, models_dir=models_dir)
    ids = [5, 9, 17, 33, 2, 8]
    run = engine.start(ids, GenerationParams(max_tokens=10))
    while not run.done:
        run.step()
    expected = list(run.result.token_ids)
    mesh = StageMesh(tmp_path)
    settings = PipelineSettings(sharding="pipeline", max_stages=n_stages)
    nodes = [mesh.add(f"p{i}", models_dir, settings=settings) for i in range(n_stages)]

    async def main() -> None:
        result = await nodes[0].generator.generate(
            GenerateRequest(model=str(gguf), prompt_tokens=ids, max_tokens=10)
        )
        assert len(result.stages) == n_stages
        assert result.token_ids == expected

    trio.run(main)


def test_cluster_config_sharding_reaches_node_settings() -> None:
    from kowalski_node.api import ClusterConfig, KowalskiRLM

    rlm = KowalskiRLM(cluster=ClusterConfig(sharding_strategy="pipeline"))
    assert rlm.settings.inference.sharding == "pipeline"
    tensor = KowalskiRLM(cluster=ClusterConfig(sharding_strategy="tensor"))
    with pytest.raises(ShardingUnsupported, match="pipeline"):
        trio.run(tensor.generate, "hi")


def test_long_prompt_in_several_messages_equals_engine(tmp_path: Path) -> None:
    """A prefix larger than one message crosses in chunk-aligned pieces, same tokens."""
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    gguf = write_tiny_gguf(models_dir / "tiny.gguf", n_layers=4)
    engine = Engine.load(gguf, models_dir=models_dir)
    ids = [(7 * i + 3) % 200 + 1 for i in range(21)]
    run = engine.start(ids, GenerationParams(max_tokens=8, prefill_chunk=4))
    while not run.done:
        run.step()
    mesh = StageMesh(tmp_path)
    settings = PipelineSettings(
        sharding="pipeline", max_stages=2, prefill_chunk=4, max_message_rows=8
    )
    nodes = [mesh.add(f"p{i}", models_dir, settings=settings) for i in range(2)]
    sent: list[int] = []
    mesh.hooks.append(lambda src, dst, t: sent.append(1) if t == "act.forward" else None)

    async def main() -> None:
        result = await nodes[0].generator.generate(
            GenerateRequest(model=str(gguf), prompt_tokens=ids, max_tokens=8)
        )
        assert result.token_ids == list(run.result.token_ids)

    trio.run(main)
    assert len(sent) >= 3 + 7  # 21 prompt rows in 3 messages, then one per decode step


def test_stage_answers_a_duplicate_without_applying_it_and_drops_stale(tmp_path: Path) -> None:
    from kowalski_node.adapters.libp2p.errors import RemoteError
    from kowalski_node.inference import wire
    from kowalski_node.llm.models import file_sha256

    models_dir = tmp_path / "models"
    models_dir.mkdir()
    gguf = write_tiny_gguf(models_dir / "tiny.gguf", n_layers=4)
    sha = file_sha256(gguf)
    mesh = StageMesh(tmp_path)
    leader = mesh.add("p0", models_dir)
    stage = mesh.add("p1", models_dir)
    route = (wire.Stage("p1", 0, 4),)

    def forward(epoch: int, step: int, pos: int, tokens: tuple[int, ...]) -> dict[str, object]:
        msg = wire.ForwardMsg("s", epoch, step, pos, sha, route, 0, (len(tokens),), "token", tokens)
        return wire.encode_forward(msg)

    async def main() -> None:
        call = leader.stages.call
        load = {"v": 1, "model": sha, "name": None, "path": str(gguf), "start": 0, "end": 4}
        await call("p1", wire.T_OFFER, {"v": 1, "model": sha, "path": str(gguf)})
        await call("p1", wire.T_LOAD, load)
        first = await call("p1", wire.T_FORWARD, forward(1, 1, 0, (3, 4, 5)))
        again = await call("p1", wire.T_FORWARD, forward(1, 1, 0, (3, 4, 5)))
        assert again == first
        assert stage.stages.stats.forwards == 1 and stage.stages.stats.duplicates == 1
        with pytest.raises(RemoteError) as stale:
            await call("p1", wire.T_FORWARD, forward(0, 9, 0, (3, 4, 5)))
        assert stale.value.code == "stale"
        with pytest.raises(RemoteError) as gap:
            await call("p1", wire.T_FORWARD, forward(1, 2, 7, (6,)))
        assert gap.value.code == "bad_sequence"
        nxt = await call("p1", wire.T_FORWARD, forward(1, 3, 3, (6,)))
        assert wire.decode_reply(nxt).step == 3
        assert stage.stages.stats.forwards == 2
        ended = await call("p1", wire.T_END, {"v": 1, "session": "s", "epoch": 1})
        assert ended["evicted"] and "s" not in stage.stages.caches

    trio.run(main)


@pytest.mark.parametrize("exact", [True, False])
def test_tiny_failover_replays_in_either_mode(tmp_path: Path, exact: bool) -> None:
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    gguf = write_tiny_gguf(models_dir / "tiny.gguf", n_layers=4)
    engine = Engine.load(gguf, models_dir=models_dir)
    ids = [5, 9, 17, 33, 2, 8]
    run = engine.start(ids, GenerationParams(max_tokens=12))
    while not run.done:
        run.step()
    mesh = StageMesh(tmp_path)
    settings = PipelineSettings(sharding="pipeline", max_stages=3)
    nodes = [mesh.add(f"p{i}", models_dir, settings=settings) for i in range(3)]
    seen: dict[str, int] = {}

    def kill(src: str, dst: str, type_: str) -> None:
        if type_ == "act.forward" and dst == "p2":
            seen["n"] = seen.get("n", 0) + 1
            if seen["n"] == 5:
                mesh.kill("p2")

    mesh.hooks.append(kill)

    async def main() -> None:
        result = await nodes[0].generator.generate(
            GenerateRequest(model=str(gguf), prompt_tokens=ids, max_tokens=12, exact_replay=exact)
        )
        assert result.failovers == 1 and "p2" not in [s["peer"] for s in result.stages]
        assert result.failover_detail[0]["lost"] == "p2"
        assert result.token_ids == list(run.result.token_ids)

    trio.run(main)
