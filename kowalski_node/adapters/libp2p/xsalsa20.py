"""XSalsa20 stream cipher, as used by the libp2p private-network (pnet) spec.

XSalsa20 = HSalsa20(key, nonce[:16]) -> 32-byte subkey, then Salsa20(subkey,
nonce[16:24]) with the block counter starting at 0. HSalsa20 runs once per
connection, so it is plain Python; the bulk keystream comes from pycryptodome's
C Salsa20 (a py-libp2p dependency), which keeps throughput at memory speed.
"""

from __future__ import annotations

import struct

from Crypto.Cipher import Salsa20

KEY_SIZE = 32
NONCE_SIZE = 24

_SIGMA = struct.unpack("<4I", b"expand 32-byte k")
_MASK = 0xFFFFFFFF


def _rotl(value: int, shift: int) -> int:
    return ((value << shift) & _MASK) | (value >> (32 - shift))


def hsalsa20(key: bytes, nonce16: bytes) -> bytes:
    """Derive the XSalsa20 subkey: 20 Salsa20 rounds without the final feed-forward."""
    if len(key) != KEY_SIZE:
        raise ValueError(f"HSalsa20 key must be {KEY_SIZE} bytes, got {len(key)}")
    if len(nonce16) != 16:
        raise ValueError(f"HSalsa20 input must be 16 bytes, got {len(nonce16)}")
    k = struct.unpack("<8I", key)
    n = struct.unpack("<4I", nonce16)
    x = [
        _SIGMA[0], k[0], k[1], k[2],
        k[3], _SIGMA[1], n[0], n[1],
        n[2], n[3], _SIGMA[2], k[4],
        k[5], k[6], k[7], _SIGMA[3],
    ]  # fmt: skip

    def quarter(a: int, b: int, c: int, d: int) -> None:
        x[b] ^= _rotl((x[a] + x[d]) & _MASK, 7)
        x[c] ^= _rotl((x[b] + x[a]) & _MASK, 9)
        x[d] ^= _rotl((x[c] + x[b]) & _MASK, 13)
        x[a] ^= _rotl((x[d] + x[c]) & _MASK, 18)

    for _ in range(10):  # 10 double rounds = 20 rounds
        quarter(0, 4, 8, 12)  # columns
        quarter(5, 9, 13, 1)
        quarter(10, 14, 2, 6)
        quarter(15, 3, 7, 11)
        quarter(0, 1, 2, 3)  # rows
        quarter(5, 6, 7, 4)
        quarter(10, 11, 8, 9)
        quarter(15, 12, 13, 14)
    return struct.pack("<8I", x[0], x[5], x[10], x[15], x[6], x[7], x[8], x[9])


class XSalsa20:
    """One direction of an XSalsa20 keystream; `apply` encrypts and decrypts alike."""

    def __init__(self, key: bytes, nonce: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"XSalsa20 key must be {KEY_SIZE} bytes, got {len(key)}")
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"XSalsa20 nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")
        subkey = hsalsa20(key, nonce[:16])
        self._cipher = Salsa20.new(key=subkey, nonce=nonce[16:])

    def apply(self, data: bytes) -> bytes:
        """XOR `data` with the next len(data) keystream bytes."""
        if not data:
            return b""
        return self._cipher.encrypt(data)


def xsalsa20_keystream(key: bytes, nonce: bytes, length: int) -> bytes:
    """The first `length` keystream bytes (for test vectors)."""
    return XSalsa20(key, nonce).apply(bytes(length))
