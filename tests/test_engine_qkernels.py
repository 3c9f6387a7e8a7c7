"""The int8 decode kernels (qkernels.py): exact codes for every GGUF type the engine reads,
llama.cpp-style activation quantisation, and their use inside the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kowalski_node.llm.builtin import LlamaModel, WeightStore
from kowalski_node.llm.builtin.qkernels import HAVE_NUMBA, QUANT_FORMATS, qmatrix_from_gguf, qmatvec
from tests.engine_fixtures import write_tiny_gguf

pytestmark = pytest.mark.skipif(not HAVE_NUMBA, reason="numba is not installed")
IDS = [5, 40, 77, 100, 3, 200, 9, 1, 44, 61]


def _f16(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8).reshape(-1, 2)


def random_blocks(qtype: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Raw GGUF blocks [rows, bytes] with random codes and sane fp16 scales."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    if qtype in ("Q8_0", "Q5_0", "Q4_1"):
        values = rng.standard_normal((rows, cols)).astype(np.float32)
        return np.asarray(quantize(values, GGMLQuantizationType[qtype]))
    n = rows * cols // 256
    if qtype == "Q4_K":
        d = _f16(rng.uniform(1e-3, 1e-2, n))
        dmin = _f16(rng.uniform(1e-3, 1e-2, n))
        rest = rng.integers(0, 256, (n, 140), dtype=np.uint8)
        blocks = np.concatenate([d, dmin, rest], axis=1)
    elif qtype == "Q6_K":
        body = rng.integers(0, 256, (n, 208), dtype=np.uint8)
        body[:, 192:208] = rng.integers(-128, 128, (n, 16)).astype(np.int8).view(np.uint8)
        blocks = np.concatenate([body, _f16(rng.uniform(1e-3, 1e-2, n))], axis=1)
    else:
        raise ValueError(qtype)
    return blocks.reshape(rows, -1)


def _dequantize(qtype: str, raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return np.asarray(dequantize(raw, GGMLQuantizationType[qtype]), np.float32).reshape(rows, cols)


@pytest.mark.parametrize("qtype", sorted(QUANT_FORMATS))
def test_codes_reproduce_gguf_dequantisation_exactly(qtype: str) -> None:
    rows, cols = 8, 512
    raw = random_blocks(qtype, rows, cols)
    values = _dequantize(qtype, raw, rows, cols)
    matrix = qmatrix_from_gguf(qtype, raw, values, rows, cols)
    assert matrix.codes.dtype == np.int8 and matrix.scale.dtype == np.float32
    assert np.array_equal(matrix.dequantize(), values)
    assert np.array_equal(matrix.dequantize_rows(np.array([3, 1])), values[[3, 1]])
    assert matrix.nbytes < values.nbytes / 2  # the point: far fewer bytes per weight


def _reference_matvec(codes_values: np.ndarray, qtype: str, x: np.ndarray) -> np.ndarray:
    """llama.cpp's arithmetic, in numpy: quantise x per activation block, then dot."""
    act = QUANT_FORMATS[qtype][1]
    ablock = 256 if act == 2 else 32
    xq = np.empty_like(x)
    xd = np.empty_like(x)
    for lo in range(0, x.size, ablock):
        part = x[lo : lo + ablock].astype(np.float64)
        amax = np.abs(part).max()
        if act == 2:
            signed = part[np.abs(part).argmax()]
            iscale = np.float32(-127.0) / np.float32(signed)
            xq[lo : lo + ablock] = np.minimum(127, np.rint(iscale * x[lo : lo + ablock]))
            xd[lo : lo + ablock] = np.float32(1.0) / iscale
        else:
            d = np.float32(amax / 127.0)
            xq[lo : lo + ablock] = np.rint(
                x[lo : lo + ablock] * (np.float32(127.0) / np.float32(amax))
            )
            xd[lo : lo + ablock] = np.float32(np.float16(d))
    return codes_values @ (xq * xd)


@pytest.mark.parametrize("qtype", sorted(QUANT_FORMATS))
def test_qmatvec_follows_quantised_activations(qtype: str) -> None:
    rows, cols = 16, 512
    raw = random_blocks(qtype, rows, cols, seed=1)
    values = _dequantize(qtype, raw, rows, cols)
    matrix = qmatrix_from_gguf(qtype, raw, values, rows, cols)
    x = np.random.default_rng(2).standard_normal(cols).astype(np.float32)
    ours = qmatvec(matrix, x)
    assert ours.dtype == np.float32
    exact = values.astype(np.float64) @ x.astype(np.float64)
    scale = float(np.abs(exact).max())
    # close to the float product (activations lose ~0.4 % to int8)...
    assert np.abs(ours - exact).max() < 0.03 * scale
    if qtype != "Q4_1":  # (Q4_1's offset term uses an fp16 block sum; see qkernels)
        # ...and equal, up to float32 summation order, to llama.cpp's quantised arithmetic
        ref = _reference_matvec(values.astype(np.float64), qtype, x)
        np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-5 * scale)
    assert np.array_equal(qmatvec(matrix, x), ours)  # deterministic


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("qk")
    return write_tiny_gguf(
        d / "qwen.gguf", arch="qwen2", tied=False, n_heads=4, n_kv_heads=2, seed=5
    )


def test_decode_with_int8_kernels_tracks_float32(tiny_qwen: Path, tmp_path: Path) -> None:
    quant = LlamaModel.load(tiny_qwen, models_dir=tmp_path, kernels="quantized")
    exact = LlamaModel.load(tiny_qwen, models_dir=tmp_path, kernels="float32")
    cache = quant.new_cache()
    quant.forward(IDS[:-1], cache, 0)  # prefill (10 rows > 4): float32 BLAS
    step = quant.forward(IDS[-1:], cache, len(IDS) - 1)[0]  # decode: int8 kernels
    full = exact.forward(IDS, None, 0)[-1]
    assert step.dtype == np.float32
    assert np.abs(step - full).max() < 0.05 * float(np.abs(full).max())
    assert int(step.argmax()) == int(full.argmax())


def test_int8_layer_ranges_compose_exactly(tiny_qwen: Path, tmp_path: Path) -> None:
    whole = LlamaModel.load(tiny_qwen, models_dir=tmp_path, kernels="quantized")
    first = LlamaModel.load(tiny_qwen, (0, 1), models_dir=tmp_path, kernels="quantized")
    second = LlamaModel.load(tiny_qwen, (1, 4), models_dir=tmp_path, kernels="quantized")
    cw, c1, c2 = whole.new_cache(), first.new_cache(), second.new_cache()
    for pos, token in enumerate(IDS[:5]):  # token by token: every product is int8
        a = whole.forward([token], cw, pos)
        h = first.run_layers(first.embed([token]), 0, 1, c1, pos)
        b = second.head(second.run_layers(h, 1, 4, c2, pos))
        assert np.array_equal(a, b)


def test_decode_only_node_builds_no_float32_matrices(tiny_qwen: Path, tmp_path: Path) -> None:
    store = WeightStore(tiny_qwen, models_dir=tmp_path)
    model = LlamaModel(store, (0, 2), kernels="quantized")
    model.run_layers(model.embed([3]), 0, 2, model.new_cache(), 0)
    names = {p.name for p in (store.cache_dir / "tensors").glob("*.npy")}  # type: ignore[operator]
    assert "blk.0.attn_q.weight.codes.npy" in names and "blk.1.ffn_down.weight.scale.npy" in names
    assert not {"blk.0.attn_qkv.npy", "blk.1.ffn_down.npy"} & names
    # a prefill chunk then builds (and caches) the float32 matrices it multiplies with
    model.run_layers(model.embed(IDS), 0, 2, model.new_cache(), 0)
    names = {p.name for p in (store.cache_dir / "tensors").glob("*.npy")}  # type: ignore[operator]
    assert "blk.0.attn_qkv.npy" in names and "blk.1.ffn_down.npy" in names


def test_float32_only_store_still_runs(tiny_qwen: Path, tmp_path: Path) -> None:
    """A store without int8 codes (like float32 shards fetched from a peer) uses BLAS."""
    store = WeightStore(tiny_qwen, models_dir=tmp_path)
    store.quant_types = {}
    model = LlamaModel(store, kernels="quantized")
    reference = LlamaModel.load(tiny_qwen, models_dir=tmp_path, kernels="float32")
    assert np.array_equal(model.forward([7], None, 0), reference.forward([7], None, 0))


def test_bad_kernel_choice_is_rejected(
    tiny_qwen: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="kernels"):
        LlamaModel.load(tiny_qwen, models_dir=tmp_path, kernels="fast")
    monkeypatch.setenv("KOWALSKI_ENGINE_KERNELS", "gpu")
    with pytest.raises(ValueError, match="KOWALSKI_ENGINE_KERNELS"):
        LlamaModel.load(tiny_qwen, models_dir=tmp_path)
