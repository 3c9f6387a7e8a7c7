"""Quantised matrix-vector products for decoding, the way llama.cpp computes them.

Decoding one token reads every weight once, so it is bound by how many bytes the weights
take and how fast they are multiplied. Float32 weights read 4 bytes per weight; here every
supported GGUF type is held exactly as int8 codes plus a float32 scale (and offset) per
block of 16 or 32 weights, about 1.1-1.5 bytes per weight:

    weight = scale[row, block] * code + offset[row, block]

Q8_0, Q5_0 (offset 0), Q4_1 (offset m), Q4_K (offset -dmin*m_j) and Q6_K (blocks of 16) all
fit this form without loss. Like llama.cpp, the activation vector is quantised to int8 too
(Q8_0 blocks of 32 with an fp16 scale for Q5_0/Q8_0, Q8_1 for Q4_1, Q8_K blocks of 256 with a
float32 scale for the K types), so each block is one integer dot product. That keeps the
builtin engine's greedy tokens close to llama.cpp's: the remaining differences are float32
summation order only.

The kernels are compiled with numba (nogil, cached on disk). Without numba the engine uses
its float32 BLAS path for everything (see `model.py`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# activation quantisation kinds, as llama.cpp pairs them with weight types
ACT_Q8_0, ACT_Q8_1, ACT_Q8_K = 0, 1, 2
# GGUF type name -> (weights per block, activation kind, has offset)
QUANT_FORMATS: dict[str, tuple[int, int, bool]] = {
    "Q8_0": (32, ACT_Q8_0, False),
    "Q5_0": (32, ACT_Q8_0, False),
    "Q4_1": (32, ACT_Q8_1, True),
    "Q4_K": (32, ACT_Q8_K, True),
    "Q6_K": (16, ACT_Q8_K, False),
}
ACT_BLOCK = {ACT_Q8_0: 32, ACT_Q8_1: 32, ACT_Q8_K: 256}

try:  # numba is an optional accelerator: the engine stays correct without it
    import numba
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None  # type: ignore[assignment]
    HAVE_NUMBA = False


@dataclass(frozen=True)
class QMatrix:
    """One weight matrix [rows=out, cols=in] as int8 codes with per-block scale/offset."""

    codes: np.ndarray  # int8 [rows, cols]
    scale: np.ndarray  # float32 [rows, cols // block]
    offset: np.ndarray | None  # float32 [rows, cols // block], or None when always 0
    block: int
    act: int
    qtype: str

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    @property
    def nbytes(self) -> int:
        extra = 0 if self.offset is None else self.offset.nbytes
        return int(self.codes.nbytes + self.scale.nbytes + extra)

    def dequantize_rows(self, rows: np.ndarray) -> np.ndarray:
        """float32 [len(rows), cols] for the given row indices (embedding lookups)."""
        codes = self.codes[rows].astype(np.float32)
        n, cols = codes.shape
        blocks = codes.reshape(n, cols // self.block, self.block)
        out = blocks * self.scale[rows][:, :, None]
        if self.offset is not None:
            out += self.offset[rows][:, :, None]
        return np.ascontiguousarray(out.reshape(n, cols), dtype=np.float32)

    def dequantize(self) -> np.ndarray:
        return self.dequantize_rows(np.arange(self.codes.shape[0]))


def _f16_bits_scale(raw: np.ndarray, offset: int) -> np.ndarray:
    """float32 view of the fp16 at byte `offset` of each block row of `raw` [n, bytes]."""
    return (
        np.ascontiguousarray(raw[:, offset : offset + 2]).view(np.float16)[:, 0].astype(np.float32)
    )


def block_scales(qtype: str, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-sub-block (scale, offset) for raw GGUF blocks [n_blocks, block_bytes]."""
    if qtype in ("Q8_0", "Q5_0"):
        return _f16_bits_scale(raw, 0)[:, None], None
    if qtype == "Q4_1":
        return _f16_bits_scale(raw, 0)[:, None], _f16_bits_scale(raw, 2)[:, None]
    if qtype == "Q4_K":
        from gguf.quants import Q4_K

        d, dmin = _f16_bits_scale(raw, 0), _f16_bits_scale(raw, 2)
        sc, m = Q4_K.get_scale_min(np.ascontiguousarray(raw[:, 4:16]))
        scale = d[:, None] * sc.astype(np.float32)
        offset = -(dmin[:, None] * m.astype(np.float32))
        return scale.astype(np.float32), offset.astype(np.float32)
    if qtype == "Q6_K":
        sc = np.ascontiguousarray(raw[:, 192:208]).view(np.int8).astype(np.float32)
        d = _f16_bits_scale(raw, 208)
        return (d[:, None] * sc).astype(np.float32), None
    raise ValueError(f"no quantised kernel for {qtype}")


def qmatrix_from_gguf(
    qtype: str, raw: np.ndarray, values: np.ndarray, rows: int, cols: int
) -> QMatrix:
    """Exact int8 codes for a GGUF tensor, given its raw blocks and its float32 values.

    `values` is gguf's own dequantisation [rows, cols]; each code is recovered as
    rint((value - offset) / scale) and the round trip is checked to be exact.
    """
    block, act, _ = QUANT_FORMATS[qtype]
    if cols % ACT_BLOCK[act] or cols % block:
        raise ValueError(f"{qtype} tensor with {cols} columns does not fill whole blocks")
    scale_b, offset_b = block_scales(qtype, raw.reshape(rows * cols // _gguf_block(qtype), -1))
    scale = scale_b.reshape(rows, cols // block).astype(np.float32)
    offset = None if offset_b is None else offset_b.reshape(rows, cols // block).astype(np.float32)
    v = values.reshape(rows, cols // block, block)
    shifted = v if offset is None else v - offset[:, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        codes_f = np.where(scale[:, :, None] == 0, 0.0, np.rint(shifted / scale[:, :, None]))
    codes = codes_f.astype(np.int8).reshape(rows, cols)
    matrix = QMatrix(np.ascontiguousarray(codes), scale, offset, block, act, qtype)
    err = float(np.max(np.abs(matrix.dequantize() - values.reshape(rows, cols)), initial=0.0))
    if err > 1e-5 * max(1.0, float(np.max(np.abs(values), initial=0.0))):
        raise ValueError(f"{qtype} codes do not reproduce the weights (max error {err})")
    return matrix


def _gguf_block(qtype: str) -> int:
    return 256 if qtype.endswith("_K") else 32


# -- kernels ------------------------------------------------------------------------------
if HAVE_NUMBA:

    @numba.njit(nogil=True, cache=True)
    def _fp16_round(x: Any) -> Any:
        """x rounded to the nearest fp16 value (ties to even), as a float (x >= 0)."""
        if x == 0.0:
            return 0.0
        if x < 6.103515625e-05:  # fp16 subnormal: fixed quantum 2**-24
            return np.rint(x * 16777216.0) / 16777216.0
        m, e = math.frexp(x)  # x = m * 2**e, 0.5 <= m < 1
        return math.ldexp(np.rint(m * 2048.0) / 2048.0, e)

    @numba.njit(nogil=True, cache=True)
    def _quantize_act(
        x: np.ndarray, kind: int, wblock: int, xq: np.ndarray, xscale: np.ndarray, xsum: np.ndarray
    ) -> None:
        """Quantise x (float32 [n]) to int8 like llama.cpp's Q8_0 / Q8_1 / Q8_K rows.

        xscale gets one scale per activation block; xsum one value per weight block
        (d * sum of codes: what a weight block's offset is multiplied by).
        """
        n = x.shape[0]
        ablock = 256 if kind == 2 else 32
        for b in range(n // ablock):
            lo = b * ablock
            amax = np.float32(0.0)
            signed_max = np.float32(0.0)
            for i in range(lo, lo + ablock):
                a = abs(x[i])
                if a > amax:
                    amax = a
                    signed_max = x[i]
            if kind == 2:  # Q8_K: float32 scale from the signed maximum
                if amax == 0.0:
                    d = np.float32(0.0)
                    for i in range(lo, lo + ablock):
                        xq[i] = 0
                else:
                    iscale = np.float32(-127.0) / signed_max
                    for i in range(lo, lo + ablock):
                        v = np.rint(iscale * x[i])
                        xq[i] = np.int8(min(127.0, v))
                    d = np.float32(1.0) / iscale
                xscale[b] = d
            else:  # Q8_0 / Q8_1: fp16 scale amax/127, codes from the unrounded scale
                d = np.float32(amax / np.float32(127.0))
                inv = np.float32(127.0) / amax if amax != 0.0 else np.float32(0.0)
                for i in range(lo, lo + ablock):
                    xq[i] = np.int8(np.rint(x[i] * inv))
                xscale[b] = np.float32(_fp16_round(d))
            # per weight block sums for the offset term
            for wb in range(ablock // wblock):
                start = lo + wb * wblock
                total: Any = 0
                for i in range(start, start + wblock):
                    total += np.int32(xq[i])
                if kind == 1:
                    xsum[start // wblock] = np.float32(_fp16_round(abs(d * total))) * (
                        1.0 if total >= 0 else -1.0
                    )
                else:
                    xsum[start // wblock] = np.float32(d * np.float32(total))

    def _make_dot(width: int) -> Any:
        """An inlined int8 dot product of `width` lanes: LLVM lowers sext+mul+reduce to
        vpmaddwd on AVX2 (numba's own typing would widen every product to int64)."""

        @intrinsic
        def dot(typingctx: Any, a: Any, a_index: Any, b: Any, b_index: Any) -> Any:
            sig = types.int32(a, a_index, b, b_index)

            def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
                a_arr, ai, b_arr, bi = args
                pa = builder.gep(
                    context.make_array(signature.args[0])(context, builder, a_arr).data, [ai]
                )
                pb = builder.gep(
                    context.make_array(signature.args[2])(context, builder, b_arr).data, [bi]
                )
                byte_vec = ir.VectorType(ir.IntType(8), width)
                int_vec = ir.VectorType(ir.IntType(32), width)
                va = builder.load(builder.bitcast(pa, byte_vec.as_pointer()), align=1)
                vb = builder.load(builder.bitcast(pb, byte_vec.as_pointer()), align=1)
                prod = builder.mul(builder.sext(va, int_vec), builder.sext(vb, int_vec))
                reduce = cgutils.get_or_insert_function(
                    builder.module,
                    ir.FunctionType(ir.IntType(32), [int_vec]),
                    f"llvm.vector.reduce.add.v{width}i32",
                )
                return builder.call(reduce, [prod])

            return sig, codegen

        return dot

    _dot16 = _make_dot(16)
    _dot32 = _make_dot(32)

    @numba.njit(nogil=True, cache=True)
    def _qmatvec32(codes, scale, offset, has_offset, per_act, xq, xscale, xsum, out):  # type: ignore[no-untyped-def]
        rows, cols = codes.shape
        for r in range(rows):
            row, srow, orow = codes[r], scale[r], offset[r if has_offset else 0]
            acc = np.float32(0.0)
            for j in range(cols // 32):
                s = np.float32(_dot32(row, j * 32, xq, j * 32))
                acc += srow[j] * xscale[j // per_act] * s
                if has_offset:
                    acc += orow[j] * xsum[j]
            out[r] = acc

    @numba.njit(nogil=True, cache=True)
    def _qmatvec16(codes, scale, offset, has_offset, per_act, xq, xscale, xsum, out):  # type: ignore[no-untyped-def]
        rows, cols = codes.shape
        for r in range(rows):
            row, srow, orow = codes[r], scale[r], offset[r if has_offset else 0]
            acc = np.float32(0.0)
            for j in range(cols // 16):
                s = np.float32(_dot16(row, j * 16, xq, j * 16))
                acc += srow[j] * xscale[j // per_act] * s
                if has_offset:
                    acc += orow[j] * xsum[j]
            out[r] = acc


_EMPTY_OFFSET = np.zeros((1, 1), np.float32)


def qmatvec(matrix: QMatrix, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """matrix @ x for one float32 vector x [cols] -> float32 [rows]."""
    rows, cols = matrix.shape
    if out is None:
        out = np.empty(rows, np.float32)
    ablock = ACT_BLOCK[matrix.act]
    xq = np.empty(cols, np.int8)
    xscale = np.empty(cols // ablock, np.float32)
    xsum = np.empty(cols // matrix.block, np.float32)
    _quantize_act(x, matrix.act, matrix.block, xq, xscale, xsum)
    offset = matrix.offset if matrix.offset is not None else _EMPTY_OFFSET
    kernel = _qmatvec32 if matrix.block == 32 else _qmatvec16
    kernel(
        matrix.codes,
        matrix.scale,
        offset,
        matrix.offset is not None,
        ablock // matrix.block,
        xq,
        xscale,
        xsum,
        out,
    )
    return out


def qmatmul_rows(matrix: QMatrix, x: np.ndarray) -> np.ndarray:
    """x [T, cols] @ matrix.T -> [T, rows], one quantised product per row of x."""
    out = np.empty((x.shape[0], matrix.shape[0]), np.float32)
    for t in range(x.shape[0]):
        qmatvec(matrix, np.ascontiguousarray(x[t]), out[t])
    return out
