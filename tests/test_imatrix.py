"""llama.cpp importance-matrix files: the layouts imatrix.cpp writes, read back the way
quantize.cpp's load_imatrix turns them into per-column floats; our writer; name mapping."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from llmpareto.compress.imatrix import (
    Imatrix,
    check_imatrix,
    imatrix_from_stats,
    read_imatrix,
    to_gguf_names,
    to_modules,
    write_imatrix,
)
from llmpareto.errors import UserError

f32 = np.float32


# --- files laid out byte by byte as llama.cpp writes them -----------------------------------

def _i32(n: int) -> bytes:
    return struct.pack("<i", n)


def legacy_like_imatrix_cpp(stats: dict[str, tuple[list[float], list[int]]], chunk_size: int,
                            last_chunk: int | None, dataset: str | None) -> bytes:
    """IMatrixCollector::save_imatrix_legacy: raw sums and per-matrix counts -> the .dat."""
    out = [_i32(len(stats))]
    for name in sorted(stats):
        values, counts = stats[name]
        b = name.encode()
        ncall = (max(counts) + chunk_size - 1) // chunk_size
        nval, nmat = len(values), len(counts)
        out += [_i32(len(b)), b, _i32(ncall), _i32(nval)]
        tmp = []
        for i in range(nval):
            count, value = f32(counts[i // (nval // nmat)]), f32(values[i])
            if count == 0:
                value = count = f32(1)
            tmp.append(f32(value / count) * f32(ncall))
        out.append(np.array(tmp, "<f4").tobytes())
    if last_chunk is not None:
        out.append(_i32(last_chunk))
        if dataset is not None:
            out += [_i32(len(dataset.encode())), dataset.encode()]
    return b"".join(out)


def _gstr(s: str) -> bytes:
    return struct.pack("<Q", len(s.encode())) + s.encode()


def gguf_like_ggml(kvs: list[tuple[str, str, object]],
                   tensors: list[tuple[str, tuple[int, int], np.ndarray]]) -> bytes:
    """gguf_write_to_file (ggml/src/gguf.cpp), version 3, alignment 32; tensors as (name, ggml
    ne, float32 data), written with ggml_n_dims dimensions (trailing ones dropped)."""
    out = [b"GGUF", struct.pack("<IQQ", 3, len(tensors), len(kvs))]
    for key, kind, val in kvs:
        out.append(_gstr(key))
        if kind == "str":
            out += [struct.pack("<I", 8), _gstr(val)]
        elif kind == "u32":
            out.append(struct.pack("<II", 4, val))
        elif kind == "i32":
            out.append(struct.pack("<Ii", 5, val))
        else:  # array of strings
            out += [struct.pack("<IIQ", 9, 8, len(val))] + [_gstr(s) for s in val]
    offset, blobs = 0, []
    for name, ne, data in tensors:
        n_dims = 2 if ne[1] > 1 else 1
        out += [_gstr(name), struct.pack("<I", n_dims), struct.pack(f"<{n_dims}q", *ne[:n_dims]),
                struct.pack("<IQ", 0, offset)]
        blob = np.asarray(data, "<f4").tobytes()
        blob += b"\0" * (-len(blob) % 32)
        blobs.append(blob)
        offset += len(blob)
    head = b"".join(out)
    return head + b"\0" * (-len(head) % 32) + b"".join(blobs)


def gguf_like_imatrix_cpp(stats: dict[str, tuple[list[float], list[float]]], chunks: int,
                          chunk_size: int, datasets: list[str]) -> bytes:
    """IMatrixCollector::save_imatrix: <name>.in_sum2 (nval/nmat, nmat) raw sums and
    <name>.counts (1, nmat), names sorted, general.type and imatrix.* keys."""
    kvs = [("general.type", "str", "imatrix"), ("imatrix.datasets", "arr", datasets),
           ("imatrix.chunk_count", "u32", chunks), ("imatrix.chunk_size", "u32", chunk_size)]
    tensors = []
    for name in sorted(stats):
        sums, counts = stats[name]
        nmat = len(counts)
        tensors += [(name + ".in_sum2", (len(sums) // nmat, nmat), np.array(sums, f32)),
                    (name + ".counts", (1, nmat), np.array(counts, f32))]
    return gguf_like_ggml(kvs, tensors)


def _write(tmp_path, name: str, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


# --- reading what llama.cpp wrote -----------------------------------------------------------

LEGACY_STATS = {
    # dense, 1024 tokens in chunks of 512: ncall 2, stored (sum/1024)*2, read back /2
    "blk.0.attn_q.weight": ([8.0, 2.0, 0.5, 0.0], [1024]),
    # two experts, one never routed to: imatrix.cpp stores 1 * ncall for it
    "blk.0.ffn_down_exps.weight": ([6.0, 1.0, 0.0, 0.0], [3, 0]),
}


def test_legacy_dat_as_imatrix_cpp_writes_it(tmp_path):
    data = legacy_like_imatrix_cpp(LEGACY_STATS, 512, last_chunk=2, dataset="wiki.train.raw")
    im = read_imatrix(_write(tmp_path, "imatrix.dat", data))
    assert im.legacy and im.chunks == 2 and im.chunk_size is None
    assert im.datasets == ["wiki.train.raw"]
    # quantize.cpp: e[i] = sums[i] / ncall
    np.testing.assert_array_equal(im.values["blk.0.attn_q.weight"],
                                  np.array([8, 2, 0.5, 0], f32) / f32(1024))
    np.testing.assert_array_equal(im.values["blk.0.ffn_down_exps.weight"],
                                  np.array([f32(6) / f32(3), f32(1) / f32(3), 1, 1], f32))
    assert all(v.dtype == np.float32 for v in im.values.values())


def test_legacy_dat_trailer_is_optional(tmp_path):
    for last_chunk, dataset in ((None, None), (7, None)):
        data = legacy_like_imatrix_cpp(LEGACY_STATS, 512, last_chunk, dataset)
        im = read_imatrix(_write(tmp_path, "old.dat", data))
        assert im.chunks == last_chunk and im.datasets == []
        assert set(im.values) == set(LEGACY_STATS)


def test_legacy_dat_zero_ncall_keeps_sums(tmp_path):
    # quantize.cpp: ncall <= 0 -> the stored sums as they are
    data = _i32(1) + _i32(3) + b"abc" + _i32(0) + _i32(2) + np.array([3, 5], "<f4").tobytes()
    im = read_imatrix(_write(tmp_path, "z.dat", data))
    np.testing.assert_array_equal(im.values["abc"], np.array([3, 5], f32))
    assert im.chunks is None


def test_gguf_as_imatrix_cpp_writes_it(tmp_path):
    stats = {
        # three chunks of 512 tokens counted into one dense matrix
        "blk.0.attn_q.weight": ([384.0, 6144.0, 0.0, 2304.0], [1536.0]),
        # three experts (ne0 = 2): 4 tokens, none (-> 1), 3 tokens
        "blk.1.ffn_down_exps.weight": ([2.0, 6.0, 0.0, 0.0, 1.0, 3.0], [4.0, 0.0, 3.0]),
    }
    data = gguf_like_imatrix_cpp(stats, chunks=3, chunk_size=512, datasets=["wiki.train.raw"])
    im = read_imatrix(_write(tmp_path, "imatrix.gguf", data))
    assert not im.legacy and (im.chunks, im.chunk_size) == (3, 512)
    assert im.datasets == ["wiki.train.raw"]
    np.testing.assert_array_equal(im.values["blk.0.attn_q.weight"],
                                  np.array([0.25, 4, 0, 1.5], f32))
    np.testing.assert_array_equal(im.values["blk.1.ffn_down_exps.weight"],
                                  np.array([0.5, 1.5, 1, 1, f32(1) / f32(3), 1], f32))


def test_gguf_counts_are_lrounded(tmp_path):
    # quantize.cpp divides by (float) std::lround(count): 2.5 -> 3, 0.49 -> 0 (-> 1), -1 -> 1
    stats = {"blk.0.ffn_up.weight": ([6.0, 5.0, 7.0], [2.5, 0.49, -1.0])}
    data = gguf_like_imatrix_cpp(stats, 1, 512, [])
    im = read_imatrix(_write(tmp_path, "r.gguf", data))
    np.testing.assert_array_equal(im.values["blk.0.ffn_up.weight"], np.array([2, 1, 1], f32))
    assert im.datasets == []


def test_format_is_told_by_content_not_extension(tmp_path):
    legacy = legacy_like_imatrix_cpp(LEGACY_STATS, 512, 2, "d")
    assert read_imatrix(_write(tmp_path, "looks.gguf", legacy)).legacy
    g = gguf_like_imatrix_cpp({"blk.0.attn_k.weight": ([4.0], [2.0])}, 1, 512, ["d"])
    assert not read_imatrix(_write(tmp_path, "looks.dat", g)).legacy


# --- our writer -----------------------------------------------------------------------------

EXACT = {"blk.0.attn_q.weight": 2.0 ** np.arange(-8, 8, dtype=f32),
         "blk.1.ffn_down.weight": np.array([0.0, 0.5, 3.0, 1024.0], f32)}


@pytest.mark.parametrize("legacy", [False, True])
def test_round_trip_is_exact_for_powers_of_two(tmp_path, legacy):
    # mean * 1024 / 1024 (GGUF) and mean * 2 / 2 (legacy, ncall = 1024 / 512) are exact
    p = write_imatrix(tmp_path / "m.imatrix", EXACT, 1024, chunk_size=512,
                      datasets=["calib.txt"], legacy=legacy)
    im = read_imatrix(p)
    assert im.legacy == legacy and set(im.values) == set(EXACT)
    for name, v in EXACT.items():
        np.testing.assert_array_equal(im.values[name], v)
    assert im.chunks == 2 and im.datasets == ["calib.txt"]
    assert im.chunk_size == (None if legacy else 512)
    assert list(tmp_path.iterdir()) == [p]  # no temporary file left behind


@pytest.mark.parametrize("legacy", [False, True])
def test_round_trip_within_one_ulp(tmp_path, legacy):
    # (mean * n) / n in float32 rounds twice: at most one unit in the last place off
    rng = np.random.default_rng(0)
    values = {f"blk.{b}.attn_v.weight": rng.random(64, dtype=f32) * 10 for b in range(3)}
    im = read_imatrix(write_imatrix(tmp_path / "r.gguf", values, 999, chunk_size=100,
                                    legacy=legacy))
    for name, v in values.items():
        np.testing.assert_array_max_ulp(im.values[name], v, maxulp=1)


def test_gguf_writer_matches_imatrix_cpp_bytes(tmp_path):
    # the file our writer makes is byte for byte what imatrix.cpp would write for these sums
    p = write_imatrix(tmp_path / "o.gguf", EXACT, 1024, chunk_size=512, datasets=["calib.txt"])
    stats = {n: (list(v * 1024), [1024.0]) for n, v in EXACT.items()}
    assert p.read_bytes() == gguf_like_imatrix_cpp(stats, 2, 512, ["calib.txt"])


def test_legacy_writer_matches_imatrix_cpp_bytes(tmp_path):
    p = write_imatrix(tmp_path / "o.dat", EXACT, 1024, chunk_size=512, datasets=["c"],
                      legacy=True)
    stats = {n: (list(v * 1024), [1024]) for n, v in EXACT.items()}
    assert p.read_bytes() == legacy_like_imatrix_cpp(stats, 512, 2, "c")


def test_write_refuses_bad_input_and_keeps_the_old_file(tmp_path):
    p = write_imatrix(tmp_path / "keep.gguf", EXACT, 1024)
    before = p.read_bytes()
    bad = [({"model.layers.0.self_attn.q_proj": np.ones(4, f32)}, 10, "to_gguf_names"),
           ({"blk.0.attn_q.weight": np.array([1, np.nan], f32)}, 10, "non-finite"),
           ({"blk.0.attn_q.weight": np.ones(4, f32)}, 0, "0 tokens"),
           ({}, 10, "no values")]
    for values, tokens, msg in bad:
        with pytest.raises(UserError, match=msg):
            write_imatrix(p, values, tokens)
    assert p.read_bytes() == before
    assert list(tmp_path.iterdir()) == [p]


# --- names ----------------------------------------------------------------------------------

def _llama_fqns(n_blocks: int) -> list[str]:
    fqns = ["model.embed_tokens", "lm_head"]
    for b in range(n_blocks):
        fqns += [f"model.layers.{b}.self_attn.{p}_proj" for p in "qkvo"]
        fqns += [f"model.layers.{b}.mlp.{p}_proj" for p in ("gate", "up", "down")]
    return fqns


def test_names_both_ways_for_a_two_block_llama():
    fqns = _llama_fqns(2)
    by_fqn = {f: np.full(3, i, f32) for i, f in enumerate(fqns)}
    by_gguf = to_gguf_names(by_fqn, 2)
    expect = {"blk.1.attn_q.weight": "model.layers.1.self_attn.q_proj",
              "blk.0.attn_output.weight": "model.layers.0.self_attn.o_proj",
              "blk.1.ffn_down.weight": "model.layers.1.mlp.down_proj",
              "blk.0.ffn_gate.weight": "model.layers.0.mlp.gate_proj",
              "token_embd.weight": "model.embed_tokens", "output.weight": "lm_head"}
    for g, f in expect.items():
        assert by_gguf[g] is by_fqn[f]
    assert len(by_gguf) == len(fqns)
    back = to_modules(Imatrix(by_gguf), fqns, 2)
    assert back.keys() == by_fqn.keys() and all(back[f] is by_fqn[f] for f in fqns)
    # only modules with an entry come back
    assert to_modules({"blk.0.attn_k.weight": by_fqn[fqns[3]]}, fqns, 2) == \
        {"model.layers.0.self_attn.k_proj": by_fqn[fqns[3]]}
    with pytest.raises(UserError, match="model.layers.0.rotary"):
        to_gguf_names({"model.layers.0.rotary": np.ones(2)}, 2)


# --- fitting a model ------------------------------------------------------------------------

def _shapes(hidden: int = 576, inter: int = 1536) -> dict[str, tuple[int, int]]:
    shapes = {"model.embed_tokens": (49152, hidden), "lm_head": (49152, hidden)}
    for b in range(2):
        for p in "qkvo":
            shapes[f"model.layers.{b}.self_attn.{p}_proj"] = (hidden, hidden)
        shapes[f"model.layers.{b}.mlp.gate_proj"] = (inter, hidden)
        shapes[f"model.layers.{b}.mlp.up_proj"] = (inter, hidden)
        shapes[f"model.layers.{b}.mlp.down_proj"] = (hidden, inter)
    return shapes


def test_check_imatrix_wrong_length():
    im = Imatrix({"blk.0.attn_q.weight": np.ones(2048, f32)})
    with pytest.raises(UserError) as e:
        check_imatrix(im, _shapes(), "big.gguf")
    assert str(e.value) == (
        "--imatrix big.gguf: made for another model: blk.0.attn_q.weight has 2048 values, this "
        "model's has 576 input columns; use --imatrix on to compute one for this model")


def test_check_imatrix_foreign_names():
    im = Imatrix({"blk.0.attn_q.weight": np.ones(576, f32),
                  "blk.7.attn_q.weight": np.ones(576, f32)})
    with pytest.raises(UserError, match=r"^--imatrix t\.gguf: made for another model: "
                                        r"blk\.7\.attn_q\.weight match no tensor"):
        check_imatrix(im, _shapes(), "t.gguf")


def test_check_imatrix_missing_is_reported_not_fatal():
    shapes = _shapes()
    im = Imatrix({"blk.0.ffn_down.weight": np.ones(1536, f32),
                  "blk.0.attn_q.weight": np.ones(576, f32),
                  # llama-quantize skips a token_embd entry of the wrong size
                  "token_embd.weight": np.ones(7, f32)})
    missing = check_imatrix(im, shapes, "x.gguf")
    assert missing == [f for f in shapes if f not in ("model.layers.0.mlp.down_proj",
                                                      "model.layers.0.self_attn.q_proj")]
    # module-keyed values are checked the same way
    by_fqn = to_modules(im, shapes, 2)
    assert check_imatrix(by_fqn, shapes, "x.gguf", n_blocks=2) == missing
    with pytest.raises(UserError, match="model.layers.1.mlp.down_proj.*very-low-bit"):
        check_imatrix(im, shapes, "x.gguf", requires=["model.layers.1.mlp.down_proj"])


# --- bad files ------------------------------------------------------------------------------

def test_unreadable_and_tiny_files(tmp_path):
    with pytest.raises(UserError, match="missing.gguf.*cannot read"):
        read_imatrix(tmp_path / "missing.gguf")
    for data in (b"", b"GG", b"GGUF", b"GGUF\x03\x00\x00\x00"):
        p = _write(tmp_path, "tiny.gguf", data)
        with pytest.raises(UserError, match="tiny.gguf"):
            read_imatrix(p)


def test_truncated_legacy_dat(tmp_path):
    data = legacy_like_imatrix_cpp(LEGACY_STATS, 512, 2, "wiki")
    entries_end = len(data) - 4 - 4 - 4  # trailer: chunk count, length, "wiki"
    for cut in range(entries_end):
        p = _write(tmp_path, "cut.dat", data[:cut])
        with pytest.raises(UserError, match="cut.dat"):
            read_imatrix(p)


def test_truncated_gguf(tmp_path):
    data = gguf_like_imatrix_cpp({"blk.0.attn_q.weight": ([1.0] * 8, [2.0])}, 1, 512, ["d"])
    last_data_end = len(data) - 28  # the 4-byte counts tensor, then padding
    for cut in range(0, last_data_end, 3):
        p = _write(tmp_path, "cut.gguf", data[:cut])
        with pytest.raises(UserError, match="cut.gguf"):
            read_imatrix(p)


def test_nonsense_sizes_fail_before_allocating(tmp_path):
    huge_name = _i32(1) + _i32(2**30) + b"x" * 16
    huge_nval = _i32(1) + _i32(1) + b"x" + _i32(1) + _i32(2**30) + b"\0" * 16
    many = _i32(2**30) + b"\0" * 32
    for data, msg in ((huge_name, "name"), (huge_nval, "values"), (many, "entries")):
        with pytest.raises(UserError, match=msg):
            read_imatrix(_write(tmp_path, "n.dat", data))
    gguf_many = b"GGUF" + struct.pack("<IQQ", 3, 2**40, 1) + b"\0" * 64
    with pytest.raises(UserError, match="claims"):
        read_imatrix(_write(tmp_path, "n.gguf", gguf_many))
    with pytest.raises(UserError, match="-5 entries"):
        read_imatrix(_write(tmp_path, "neg.dat", _i32(-5) + b"\0" * 8))


def test_gguf_that_is_not_an_imatrix(tmp_path):
    model = gguf_like_ggml([("general.architecture", "str", "llama"),
                            ("general.type", "str", "model")],
                           [("token_embd.weight", (4, 2), np.ones(8, f32))])
    with pytest.raises(UserError, match="'model'.*not an importance matrix"):
        read_imatrix(_write(tmp_path, "model.gguf", model))
    keys = [("imatrix.datasets", "arr", ["d"]), ("imatrix.chunk_count", "i32", 1),
            ("imatrix.chunk_size", "u32", 512)]
    t = [("blk.0.attn_q.weight.in_sum2", (2, 1), np.ones(2, f32)),
         ("blk.0.attn_q.weight.counts", (1, 1), np.ones(1, f32))]
    with pytest.raises(UserError, match="imatrix.chunk_count.*uint32"):
        read_imatrix(_write(tmp_path, "i32.gguf", gguf_like_ggml(keys, t)))
    keys[1] = ("imatrix.chunk_count", "u32", 1)
    with pytest.raises(UserError, match="only one of"):
        read_imatrix(_write(tmp_path, "half.gguf", gguf_like_ggml(keys, t[:1])))
    with pytest.raises(UserError, match="no .*in_sum2"):
        read_imatrix(_write(tmp_path, "none.gguf", gguf_like_ggml(
            keys, [("blk.0.attn_q.weight", (2, 1), np.ones(2, f32))])))
    odd = [t[0], ("blk.0.attn_q.weight.counts", (1, 3), np.ones(3, f32))]
    with pytest.raises(UserError, match="2 sums for 3 counts"):
        read_imatrix(_write(tmp_path, "odd.gguf", gguf_like_ggml(keys, odd)))


# --- from our calibration statistics --------------------------------------------------------

def test_imatrix_from_stats_full_and_diagonal():
    import torch

    from llmpareto.compress.prune import InputStats

    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    full, diag = InputStats.empty(2), InputStats.empty(2, diag_only=True)
    full.add(x)
    diag.add(x)
    got = imatrix_from_stats({"a": full, "b": diag})
    for v in got.values():
        assert v.dtype == np.float32
        np.testing.assert_array_equal(v, np.array([5.0, 10.0], f32))  # (1+9)/2, (4+16)/2
    with pytest.raises(UserError, match="c saw no calibration tokens"):
        imatrix_from_stats({"c": InputStats.empty(2)})
