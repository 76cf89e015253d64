"""Untrusted input (issue 15): a GGUF is checked before anything is sized from it, a model or
text too large for memory is refused with the numbers (--where, study names and a model's own
Python: test_untrusted_code.py).

Pickle checkpoints refused without --allow-pickle: tests/test_bad_input.py
test_pickle_checkpoint_needs_allow_pickle (checks the message names the file and the flag).
"""

from __future__ import annotations

import struct
import time
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest

from llmpareto.cli import main
from llmpareto.errors import UserError
from llmpareto.gguf_check import check_gguf, read_header

# --- GGUF files: good ones written by the gguf package, then tampered byte by byte -----------

def write_gguf(path: Path, alignment: int | None = None) -> Path:
    """A tiny GGUF as the gguf package writes it: strings, arrays, f32 / f16 / q8_0 tensors."""
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_name("tiny")
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_token_list(["<s>", "</s>", "hello", "world"])
    w.add_token_scores([0.0, 0.0, -1.0, -2.0])
    w.add_uint32("tiny.count", 7)
    w.add_tensor("a.weight", np.arange(4 * 32, dtype=np.float32).reshape(4, 32))
    w.add_tensor("b.weight", np.ones((2, 64), dtype=np.float16))
    q = gguf.quants.quantize(np.linspace(-1, 1, 3 * 64, dtype=np.float32).reshape(3, 64),
                             gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("c.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


class Layout:
    """Byte positions inside a good file, read with the gguf package's own reader."""

    def __init__(self, path: Path):
        r = gguf.GGUFReader(path)
        self.size, self.data_offset = path.stat().st_size, r.data_offset
        name = r.fields["general.name"]
        # key length (8), key, value type (4), then the string's length
        self.name_len = name.offset + 8 + len("general.name") + 4
        self.key_len = name.offset
        self.tensors = {}
        self.data_end = max(int(t.data_offset) + int(t.n_bytes) for t in r.tensors)
        for t in r.tensors:
            start = t.field.offset + 8 + len(t.name)  # at n_dims
            n_dims = len(t.shape)
            self.tensors[t.name] = {"n_dims": start, "dim0": start + 4,
                                    "type": start + 4 + 8 * n_dims,
                                    "offset": start + 8 + 8 * n_dims,
                                    "end": start + 16 + 8 * n_dims}


@pytest.fixture
def good(tmp_path) -> tuple[Path, Layout]:
    path = write_gguf(tmp_path / "good.gguf")
    return path, Layout(path)


def tamper(path: Path, at: int, fmt: str, value) -> Path:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, at, value)
    out = path.with_name("bad.gguf")
    out.write_bytes(bytes(data))
    return out


def refused(path: Path, *words: str) -> str:
    with pytest.raises(UserError) as info:
        check_gguf(path)
    msg = str(info.value)
    assert str(path) in msg and "re-download" in msg and "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


@pytest.mark.parametrize("alignment", [None, 64])
def test_files_the_gguf_package_writes_pass(tmp_path, alignment):
    path = write_gguf(tmp_path / "ok.gguf", alignment)
    check_gguf(path)
    header, reader = read_header(path), gguf.GGUFReader(path)
    assert header.data_start == reader.data_offset
    assert header.alignment == (alignment or 32)
    assert {t.name: (t.n_elements, t.n_bytes) for t in header.tensors} == \
        {t.name: (int(t.n_elements), int(t.n_bytes)) for t in reader.tensors}


def test_string_arrays_longer_than_the_read_window(tmp_path):
    from llmpareto.gguf_check import _WINDOW

    w = gguf.GGUFWriter(str(tmp_path / "long.gguf"), arch="llama")
    w.add_token_list(["a", "é" * _WINDOW, *(f"t{i}" for i in range(50_000)), "b"])
    w.add_tensor("a.weight", np.ones((2, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    path = tmp_path / "long.gguf"
    assert read_header(path).data_start == gguf.GGUFReader(path).data_offset


def test_the_embedded_model_passes_quickly():
    from llmpareto.models import DEFAULT_MODEL, resolve_model

    src = resolve_model(DEFAULT_MODEL)
    path = Path(src.directory) / src.gguf_file
    start = time.perf_counter()
    header = read_header(path)
    assert time.perf_counter() - start < 2.0  # 49k-token vocabulary, ~50 ms on one core
    assert header.n_elements == sum(int(t.n_elements) for t in gguf.GGUFReader(path).tensors)


@pytest.mark.parametrize("where_cut", ["magic", "counts", "kv", "tensor_infos", "data"])
def test_truncated_files(good, where_cut):
    path, lay = good
    cut = {"magic": 3, "counts": 20, "kv": lay.name_len + 4,
           "tensor_infos": lay.tensors["b.weight"]["dim0"] + 3,
           "data": lay.data_end - 1}[where_cut]
    short = path.with_name("short.gguf")
    short.write_bytes(path.read_bytes()[:cut])
    refused(short, "bytes")


def test_a_tensor_claiming_a_terabyte_is_refused_fast_and_small(good):
    path, lay = good
    # a.weight is f32 (32, 4): 2**38 x 4 elements of 4 bytes = 4 TiB, in a 1 kB file
    bad = tamper(path, lay.tensors["a.weight"]["dim0"], "<Q", 2**38)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        msg = refused(bad, "'a.weight'", "past the end")
    finally:
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert elapsed < 1.0 and peak < 50 * 2**20, (elapsed, peak)
    assert str(2**40) in msg  # the element count it claimed


@pytest.mark.parametrize("case, words", [
    ("elements_2_40", ["'a.weight'", "past the end"]),
    ("offset_past_end", ["'c.weight'", "past the end"]),
    ("string_2_62", [str(2**62), "general.name"]),
    ("key_2_62", [str(2**62), "key 0"]),
    ("tensor_count_2_60", [str(2**60), "tensors"]),
    ("kv_count_2_40", [str(2**40), "keys"]),
    ("bad_magic", ["b'GGUX'", "magic"]),
    ("version_1", ["version 1", "2 and 3"]),
    ("big_endian", ["big-endian"]),
    ("unknown_type", ["GGML type 99"]),
    ("removed_type", ["GGML type 4"]),  # Q4_2, removed from ggml
    ("five_dims", ["5 dimensions", "at most 4"]),
    ("zero_dim", ["zero dimension"]),
    ("overflow", ["2**63"]),
    ("overlap", ["overlap", "'a.weight'", "'b.weight'"]),
    ("misaligned", ["not a multiple of the alignment 32"]),
    ("block_size", ["multiple of the 32-element blocks of Q8_0"]),
])
def test_tampered_headers_are_refused(good, case, words):
    path, lay = good
    a, b, c = (lay.tensors[n] for n in ("a.weight", "b.weight", "c.weight"))
    edits = {
        "elements_2_40": (a["dim0"], "<Q", 2**40),
        "offset_past_end": (c["offset"], "<Q", 2**40),
        "string_2_62": (lay.name_len, "<Q", 2**62),
        "key_2_62": (24, "<Q", 2**62),  # the first key's length, right after the counts
        "tensor_count_2_60": (8, "<Q", 2**60),
        "kv_count_2_40": (16, "<Q", 2**40),
        "bad_magic": (0, "4s", b"GGUX"),
        "version_1": (4, "<I", 1),
        "big_endian": (4, ">I", 3),
        "unknown_type": (a["type"], "<I", 99),
        "removed_type": (a["type"], "<I", 4),
        "five_dims": (a["n_dims"], "<I", 5),
        "zero_dim": (b["dim0"], "<Q", 0),
        "overflow": (a["dim0"], "<Q", 2**62),  # x 4 rows: 2**64 elements
        "overlap": (b["offset"], "<Q", 0),
        "misaligned": (b["offset"], "<Q", 8),
        "block_size": (c["dim0"], "<Q", 48),
    }
    bad = tamper(path, *edits[case])
    start = time.perf_counter()
    refused(bad, *words)
    assert time.perf_counter() - start < 1.0


def test_not_a_file(tmp_path):
    with pytest.raises(UserError, match="cannot open it"):
        check_gguf(tmp_path / "missing.gguf")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    refused(empty, "magic")


# --- wired in: every way a user's GGUF is opened checks it first ---------------------------

def run_search(capsys, *argv) -> tuple[int, str]:
    code = main(["search", "--no-progress", *argv])
    return code, capsys.readouterr().err


def tiny_args(model, tmp_path, *extra) -> list[str]:
    return ["--model", str(model), "--runs-dir", str(tmp_path / "runs"), "--window", "64",
            "--eval-tokens", "256", "--calib-tokens", "128", "--context", "512",
            "--trials", "2", "--formats", "f16,q8_0", "--presets", "none", *extra]


def test_cli_refuses_a_tampered_gguf_in_one_line(good, tmp_path, capsys):
    path, lay = good
    bad = tamper(path, lay.tensors["a.weight"]["dim0"], "<Q", 2**40)
    code, err = run_search(capsys, *tiny_args(bad, tmp_path))
    assert code == 2 and err.startswith("llmpareto: error: GGUF file ") and str(bad) in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_load_arch_checks_the_gguf_first(good):
    from llmpareto.models import load_arch

    bad = tamper(good[0], 8, "<Q", 2**60)
    with pytest.raises(UserError, match=r"claims 1152921504606846976 tensors"):
        load_arch(str(bad))


# --- too large for memory: refused with the numbers before loading --------------------------

@pytest.fixture
def little_memory(monkeypatch):
    from llmpareto import models

    monkeypatch.setattr(models, "available_memory_bytes", lambda: 1000)


def test_model_larger_than_memory_is_refused_with_the_numbers(tiny_model_dir, little_memory,
                                                               monkeypatch):
    from transformers import AutoModelForCausalLM

    from llmpareto.models import load_model, load_size, resolve_model

    source = resolve_model(str(tiny_model_dir))
    _, weights, need = load_size(source)
    assert need == 4 * weights  # float32, as load_model loads it
    loaded = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loaded.append(1))
    with pytest.raises(UserError) as info:
        load_model(source)
    msg = str(info.value)
    assert f"{weights} weights" in msg and f"({need} bytes)" in msg and "(1000 bytes)" in msg
    assert "smaller model" in msg and not loaded


def test_safetensors_size_matches_the_model(tiny_model_dir):
    from llmpareto.models import load_model, load_size, resolve_model

    model, _ = load_model(resolve_model(str(tiny_model_dir)))
    stored = {p.data_ptr(): p.numel() for p in model.state_dict().values()}
    assert load_size(resolve_model(str(tiny_model_dir)))[1] == sum(stored.values())


def test_gguf_larger_than_memory_counts_dequantized_float32(good, little_memory):
    from llmpareto.models import GGUF_LOAD_COPIES, check_memory, resolve_model

    path, _ = good
    n = read_header(path).n_elements
    with pytest.raises(UserError) as info:
        check_memory(resolve_model(str(path)))
    assert f"{n} weights" in str(info.value)
    assert f"({n * 4 * GGUF_LOAD_COPIES} bytes)" in str(info.value)


def test_cli_model_too_large(tiny_model_dir, tmp_path, capsys, little_memory):
    code, err = run_search(capsys, *tiny_args(tiny_model_dir, tmp_path))
    assert code == 2 and err.startswith("llmpareto: error: model ") and "1000 bytes" in err


def test_text_larger_than_memory_is_refused_before_reading(tmp_path, little_memory, monkeypatch,
                                                           capsys, tiny_model_dir):
    from llmpareto.text import TOKENIZE_BYTES_PER_BYTE, read_text

    f = tmp_path / "big.txt"
    f.write_text("word " * 1000)
    monkeypatch.setattr(Path, "read_text", lambda *a, **k: pytest.fail("text was read"))
    with pytest.raises(UserError) as info:
        read_text([str(f)])
    msg = str(info.value)
    assert "(5000 bytes)" in msg and f"({5000 * TOKENIZE_BYTES_PER_BYTE} bytes" in msg
    assert "(1000 bytes)" in msg and "shorter text" in msg
    monkeypatch.undo()
    from llmpareto import models

    monkeypatch.setattr(models, "available_memory_bytes", lambda: 1000)
    code, err = run_search(capsys, *tiny_args(tiny_model_dir, tmp_path, "--text", str(f)))
    assert code == 2 and err.startswith(f"llmpareto: error: --text {f}: ")


def test_memory_probe_reads_meminfo():
    from llmpareto.models import available_memory_bytes

    free = available_memory_bytes()
    assert free is None or free > 0
