"""The ast-free `.npy` reader: it reads what np.save writes, refuses the rest, never parses Python."""

from __future__ import annotations

import ast
import io
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kowalski_node.llm.builtin.npy import load_npy, npy_from_bytes, parse_header

DTYPES = st.sampled_from(["<f4", ">f4", "<f2", "|i1", "<i4", "<i8", "|u1", "<f8", "|b1"])


def _saved(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(DTYPES, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)),
    st.booleans(),
)
def test_round_trip_equals_np_load(array: np.ndarray, fortran: bool) -> None:
    if fortran:
        array = np.asfortranarray(array)
    data = _saved(array)
    expected = np.load(io.BytesIO(data), allow_pickle=False)
    got = npy_from_bytes(data)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


def test_file_is_memory_mapped_read_only_and_equal(tmp_path: Path) -> None:
    array = np.arange(24, dtype=np.float32).reshape(4, 6)
    path = tmp_path / "t.npy"
    np.save(path, array)
    got = load_npy(path)
    assert isinstance(got, np.memmap)
    np.testing.assert_array_equal(got, array)
    with pytest.raises(ValueError):
        got[0, 0] = 1.0  # read-only: a cache entry cannot be scribbled on
    np.testing.assert_array_equal(load_npy(path, mmap=False), array)


def test_never_calls_the_ast_parser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "t.npy"
    np.save(path, np.ones((3, 2), dtype=np.int8))
    data = path.read_bytes()

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("ast used")

    monkeypatch.setattr(ast, "literal_eval", refuse)
    monkeypatch.setattr(ast, "parse", refuse)
    assert load_npy(path).shape == (3, 2)
    assert npy_from_bytes(data).shape == (3, 2)


def test_many_threads_load_at_once(tmp_path: Path) -> None:
    paths = []
    for i in range(8):
        path = tmp_path / f"{i}.npy"
        np.save(path, np.full((16, 16), i, dtype=np.float32))
        paths.append(path)
    errors: list[BaseException] = []
    sums: list[float] = []

    def work() -> None:
        try:
            for _ in range(50):
                for path in paths:
                    sums.append(float(load_npy(path).sum()))
        except BaseException as exc:  # the thread's failure must reach the test
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert len(sums) == 6 * 50 * 8
    assert set(sums) == {256.0 * i for i in range(8)}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "magic"),
        (b"PK\x03\x04" + b"\0" * 20, "magic"),
        (b"\x93NUMPY\x09\x00" + b"\0" * 20, "version"),
        (b"\x93NUMPY\x01\x00\xff\xff{'descr'", "truncated"),
        (b"\x93NUMPY\x02\x00\xff\xff\xff\x7f", "truncated or oversized"),
        (b"\x93NUMPY\x01\x00\x10\x00__import__('os')", "plain array header"),
    ],
)
def test_malformed_headers_are_value_errors(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        npy_from_bytes(data)


def test_object_arrays_and_wrong_sizes_are_refused(tmp_path: Path) -> None:
    header = b"{'descr': '|O', 'fortran_order': False, 'shape': (2,), }"
    with pytest.raises(ValueError, match="objects"):
        parse_header(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header)
    data = _saved(np.zeros(10, dtype=np.float32))
    with pytest.raises(ValueError, match="describes"):
        npy_from_bytes(data[:-4])  # truncated body
    path = tmp_path / "long.npy"
    path.write_bytes(data + b"\0\0\0\0")
    with pytest.raises(ValueError, match="describes"):
        load_npy(path)
