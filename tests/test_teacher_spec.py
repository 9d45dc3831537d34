"""docs/FORMAT.md, "Teacher record blocks", is enough to decode a block: an independent decoder written from that
section alone (numpy, struct and a zstd binding; nothing of logitstore's codec), checked against the library's."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from numcodecs import zstd

from logitstore import teacher as T
from logitstore import teacher_blocks as B
from logitstore import topk_codec as C

PRESET = {1: ("exact", None), 2: ("log", 2.0 ** -10), 3: ("log", 2.0 ** -6), 4: ("log", 2.0 ** -3),
          5: ("sqrt", 2.0 ** -6), 6: ("sqrt", 2.0 ** -5)}


def frame(blob: bytes) -> bytes:
    """A stream: one zstd frame with its content size and checksum (the size is read from the frame header), and
    nothing after it (its length found by walking its block headers)."""
    fhd = blob[4]
    assert fhd & 0x04 and not fhd & 0x03  # checksum, no dictionary
    single, fcs = (fhd >> 5) & 1, fhd >> 6
    pos = 5 + (0 if single else 1)
    width = (1 if single else 0, 2, 4, 8)[fcs]
    size = int.from_bytes(blob[pos:pos + width], "little") + (256 if width == 2 else 0)
    end = pos + width
    while True:
        head = int.from_bytes(blob[end:end + 3], "little")
        end += 3 + (1 if (head >> 1) & 3 == 1 else head >> 3)
        if head & 1:
            break
    assert end + 4 == len(blob)  # the checksum, then nothing
    out = bytearray(size)
    zstd.decompress(blob, out)
    return bytes(out)


def varints(raw: bytes) -> list[int]:
    out, value, shift = [], 0, 0
    for byte in raw:
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            assert byte or shift == 7  # shortest form: a last byte of 0 only when it is the only one
            out.append(value)
            value, shift = 0, 0
    assert shift == 0
    return out


def floats(raw: bytes, count: int) -> list[float]:
    planes = [raw[j * count:(j + 1) * count] for j in range(4)]
    return [struct.unpack("<f", bytes(p[i] for p in planes))[0] for i in range(count)]


def context(blob: bytes, vocab: int) -> tuple[list[int], list[int] | None]:
    v = varints(frame(blob))
    m = v[0]
    prefix, flag = v[1:m + 1], v[m + 1]
    order = prefix + sorted(set(range(vocab)) - set(prefix))
    return order, (v[m + 2:] if flag == 1 else None)


def block(data: bytes, order: list[int]):
    magic, kind, codec, n, k, m = struct.unpack_from("<4sBBIIB", data)
    assert magic == b"LTB2"
    sizes = struct.unpack_from(f"<{m}I", data, 15)
    streams, at = [], 15 + 4 * m
    for size in sizes:
        streams.append(data[at:at + size])
        at += size
    if kind == 2:  # sampled: counts, then ranks (first, then gaps >= 1)
        counts, gaps = varints(frame(streams[0])), varints(frame(streams[1]))
        out, i = [], 0
        for _ in range(n):
            total, rank, pos = 0, 0, []
            while total < k:
                rank = gaps[i] if not pos else rank + gaps[i]
                pos.append((order[rank], counts[i]))
                total += counts[i]
                i += 1
            out.append(sorted(pos))
        return out
    domain, step = PRESET[codec]
    gaps = varints(frame(streams[0]))
    ranks = []
    for p in range(n):
        r, row = -1, []
        for g in gaps[p * k:(p + 1) * k]:
            r += g + 1
            row.append(r)
        ranks.append(row)
    if domain == "exact":
        values = floats(frame(streams[1]), n * k)
        lp = [values[p * k:(p + 1) * k] for p in range(n)]
        tails = floats(frame(streams[2]), n)
    elif domain == "log":
        v, tcodes = varints(frame(streams[1])), varints(frame(streams[2]))
        top, off = v[:n], v[n:]
        lp = [[-(top[p] + o) * step for o in off[p * k:(p + 1) * k]] for p in range(n)]
        tails = []
        for p in range(n):
            c = tcodes[p]
            z = c - 1
            offset = z // 2 if z % 2 == 0 else -(z + 1) // 2
            tails.append(-math.inf if c == 0 else -top[p] * step - offset * step)
    else:
        u, tcodes = varints(frame(streams[1])), varints(frame(streams[2]))

        def logp(c):
            return 2 * math.log(c * step if c > 0 else step / 4)

        lp = [[logp(c) for c in u[p * k:(p + 1) * k]] for p in range(n)]
        tails = [-math.inf if c == 0 else logp(c - 1) for c in tcodes]
    out = []
    for p in range(n):
        entries = sorted(((-lp[p][j], order[ranks[p][j]]) for j in range(k)))  # most likely first, ties by id
        out.append(([e[1] for e in entries], [-e[0] for e in entries], tails[p]))  # float64, rounded by the caller
    return out


@pytest.mark.parametrize("codec", ["exact", "standard", "compact", "sqrt", "sqrt-compact"])
def test_an_independent_decoder_reads_top_k_blocks(codec):
    x = np.random.default_rng(4).standard_normal((30, 200)) * 2.5
    rec = T.top_k(x, 7)
    ctx = C.vocab_order(rec.ids, 200, tail_mass=T.tail_mass(x, rec.ids))
    blob = C.encode_order(ctx)
    order, prior = context(blob, 200)
    assert order == ctx.order.tolist() and prior == ctx.prior_codes.tolist()
    (data,) = B.encode_blocks(rec, ctx, codec)
    mine = block(data, order)
    lib = B.decode_block(data, kind="top_k", k=7, positions=30, order=ctx, codec=codec)
    assert (lib.ids.dtype, lib.logps.dtype, lib.tail_logp.dtype) == (np.int32, np.float32, np.float32)
    assert [r[0] for r in mine] == lib.ids.tolist()
    logps, tails = np.array([r[1] for r in mine], np.float32), np.array([r[2] for r in mine], np.float32)
    if codec.startswith("sqrt"):  # float64 ln of another libm: at most the last float32 bit apart
        assert np.all(np.abs(logps.view(np.int32) - lib.logps.view(np.int32)) <= 1)
        assert np.all(np.abs(tails.view(np.int32) - lib.tail_logp.view(np.int32)) <= 1)
    else:  # float64 arithmetic exact, rounded once to float32: bit for bit
        assert logps.tobytes() == lib.logps.tobytes() and tails.tobytes() == lib.tail_logp.tobytes()


def test_an_independent_decoder_reads_sampled_blocks():
    x = np.random.default_rng(5).standard_normal((25, 200))
    s = T.sample(x, 12, seed=3)
    ctx = C.vocab_order(s.ids[s.counts > 0], 200)
    order, prior = context(C.encode_order(ctx), 200)
    assert prior is None
    (data,) = B.encode_blocks(s, ctx)
    mine = block(data, order)
    lib = B.decode_block(data, kind="sampled", k=12, positions=25, order=ctx)
    assert (lib.ids.dtype, lib.counts.dtype) == (np.int32, np.uint16)
    for p in range(25):  # distinct ids ascending with their counts, then padding (id 0, count 0) up to K
        pad = [(0, 0)] * (12 - len(mine[p]))
        assert list(zip(lib.ids[p].tolist(), lib.counts[p].tolist())) == mine[p] + pad
