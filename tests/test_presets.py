"""llama.cpp presets: the recipes are the types llama.cpp wrote, and byte for byte our formats."""

import ctypes
import json
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest

from llmpareto.arch import Arch
from llmpareto.compress import VariantCache, apply
from llmpareto.errors import UserError
from llmpareto.formats import FORMATS, SIMPLE_FORMATS, effective_format, get_format
from llmpareto.gguf_write import gguf_name, permute_rows
from llmpareto.models import load_model, resolve_model
from llmpareto.recipe import Recipe
from llmpareto.spaces import presets as P
from llmpareto.tiny import build_tiny_model

OURS = {f.gguf_type: f.name for f in FORMATS.values() if f.gguf_type is not None}
SHAPE = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "vocab_size": 1024}


class Tiny:
    def __init__(self, folder: Path):
        self.source = resolve_model(str(folder))
        self.model, self.tokenizer = load_model(self.source)
        self.arch = Arch.from_model(self.model)
        self.cache = VariantCache(self.model, self.arch)
        self.args = (self.model, self.cache, self.source, self.tokenizer)

    def imatrix(self, seed: int) -> dict[str, np.ndarray]:
        """Random positive importance, the same for projections that read the same input
        (as llama-imatrix records it)."""
        rng = np.random.default_rng(seed)
        out = {}
        for t in self.arch.tensors:
            shared = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
                      "mlp.up_proj": "mlp.gate_proj"}.get(t.kind)
            twin = t.fqn[:-len(t.kind)] + shared if shared else None
            out[t.fqn] = out[twin] if twin in out else rng.uniform(0.05, 4, t.cols).astype("f4")
        return out


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Tiny:
    """Rows of 256 and 512: every K-quant fits, nothing falls back; tied embeddings."""
    folder = tmp_path_factory.mktemp("wide") / "m"
    return Tiny(build_tiny_model(folder, hidden_size=256, intermediate_size=512, **SHAPE))


@pytest.fixture(scope="module")
def narrow(tmp_path_factory) -> Tiny:
    """Rows of 64 and 128: every K-quant falls back; an untied output head."""
    folder = tmp_path_factory.mktemp("narrow") / "m"
    return Tiny(build_tiny_model(folder, tie=False, hidden_size=64, intermediate_size=128,
                                 **SHAPE))


def _run(tiny: Tiny, workdir: Path, imatrix=None, presets=P.PRESETS):
    recipes = P.llama_cpp_presets(*tiny.args, presets=presets, imatrix=imatrix,
                                  workdir=workdir, keep_files=True)
    return recipes, {name: workdir / f"{name}.gguf" for name in presets}


@pytest.fixture(scope="module")
def wide_runs(wide, tmp_path_factory):
    imx = wide.imatrix(1)
    return {"plain": (*_run(wide, tmp_path_factory.mktemp("plain")), None),
            "imatrix": (*_run(wide, tmp_path_factory.mktemp("imx"), imx), imx)}


def _file_tensors(path: Path, tiny: Tiny) -> dict[str, object]:
    """fqn -> ReaderTensor, read with the gguf package (not the code under test)."""
    n = tiny.model.config.num_hidden_layers
    by_name = {t.name: t for t in gguf.GGUFReader(path).tensors}
    return {t.fqn: by_name[gguf_name(t.fqn + ".weight", n)] for t in tiny.arch.tensors}


def _check_bytes(tiny: Tiny, recipes, files, imx) -> None:
    cfg = tiny.model.config
    heads = {"self_attn.q_proj": cfg.num_attention_heads,
             "self_attn.k_proj": cfg.num_key_value_heads}
    kinds = {t.fqn: t.kind for t in tiny.arch.tensors}
    for preset, path in files.items():
        for fqn, tensor in _file_tensors(path, tiny).items():
            w = tiny.cache.base[fqn].numpy()
            if kinds[fqn] in heads:
                w = permute_rows(w, heads[kinds[fqn]])
            ours = get_format(recipes[preset][fqn]).quantize(w, None if imx is None else imx[fqn])
            theirs = np.asarray(tensor.data)
            assert ours.view(np.uint8).tobytes() == theirs.view(np.uint8).tobytes(), \
                (preset, fqn, recipes[preset][fqn])


@pytest.mark.parametrize("run", ["plain", "imatrix"])
def test_recipes_are_the_types_llama_cpp_wrote(wide, wide_runs, run):
    recipes, files, _ = wide_runs[run]
    assert list(recipes) == list(P.PRESETS)
    for preset, path in files.items():
        written = {fqn: OURS[int(t.tensor_type)] for fqn, t in _file_tensors(path, wide).items()}
        assert recipes[preset] == written, preset
        norms = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors if "norm" in t.name}
        assert norms == {"F32"}  # not searched, and llama.cpp leaves them alone
    assert not (files["Q8_0"].parent / "model-f32.gguf").exists()
    assert set(recipes["Q8_0"].values()) == {"q8_0"}
    assert len(set(recipes["Q4_K_M"].values())) >= 2  # llama.cpp mixes types
    assert set(recipes["Q4_K_M"].values()) <= {"q4_K", "q6_K"}


@pytest.mark.parametrize("run", ["plain", "imatrix"])
def test_our_formats_make_llama_cpps_bytes(wide, wide_runs, run):
    _check_bytes(wide, *wide_runs[run])


def test_the_imatrix_reaches_llama_cpp(wide, wide_runs, tmp_path):
    (_, plain, _), (_, weighted, imx) = wide_runs["plain"], wide_runs["imatrix"]
    changed = [name for name, path in plain.items()
               if path.read_bytes() != weighted[name].read_bytes()]
    assert changed and "Q4_K_M" in changed
    # k, v take q's entry and up takes gate's: they read the same input
    lean = {fqn: v for fqn, v in imx.items() if not fqn.endswith(("k_proj", "v_proj", "up_proj"))}
    _, files = _run(wide, tmp_path, lean, ("Q4_K_M",))
    assert files["Q4_K_M"].read_bytes() == weighted["Q4_K_M"].read_bytes()


def test_narrow_rows_fall_back_as_llmpareto_says(wide, wide_runs, narrow, tmp_path):
    """Same blocks, rows of 64/128: each tensor gets effective_format of what the preset asked
    for on 256-wide rows; and the fallbacks are byte-identical too."""
    asked = wide_runs["plain"][0]
    imx = narrow.imatrix(2)
    for run, matrix in (("plain", None), ("imatrix", imx)):
        recipes, files = _run(narrow, tmp_path / run, matrix)
        _check_bytes(narrow, recipes, files, matrix)
        for preset, recipe in recipes.items():
            want = dict(asked[preset])
            # tied on the wide model the embedding is llama.cpp's output tensor; untied here,
            # the head is, and the embedding gets the preset's base type (ffn_gate's)
            want["lm_head"] = want["model.embed_tokens"]
            want["model.embed_tokens"] = want["model.layers.0.mlp.gate_proj"]
            cols = {t.fqn: t.cols for t in narrow.arch.tensors}
            assert recipe == {f: effective_format(want[f], c) for f, c in cols.items()}, preset
            assert set(recipe.values()) <= set(SIMPLE_FORMATS)
    assert recipes["Q6_K"]["model.layers.0.mlp.up_proj"] == "q8_0"
    assert set(recipes["Q4_K_M"].values()) == {"q5_0", "q8_0"}


def test_disk_cache(narrow, tmp_path, monkeypatch):
    real, calls = llama_cpp.llama_model_quantize, []

    def counted(*args):
        calls.append(args[0])
        return real(*args)

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", counted)
    file, presets = tmp_path / "c" / "presets.json", ("Q4_K_M", "Q8_0")

    def run(imatrix=None, fingerprint="tiny-64"):
        return P.presets_cached(*narrow.args, fingerprint=fingerprint, cache_file=file,
                                presets=presets, imatrix=imatrix)

    first = run()
    assert len(calls) == 2
    key = json.loads(file.read_text())["entries"][0]["key"]
    assert key["llama_cpp_python"] and key["imatrix_sha256"] == "none"
    assert run() == first and len(calls) == 2  # a hit does not run llama.cpp
    run(narrow.imatrix(3))
    assert len(calls) == 4  # another importance matrix misses
    run(narrow.imatrix(3))
    run(fingerprint="other")
    assert len(calls) == 6
    assert len(json.loads(file.read_text())["entries"]) == 3
    for junk in (b"\xff\x00{", b"[]", b'{"version": 1, "entries": [{"key": 1}]}'):
        file.write_bytes(junk)
        assert run() == first  # ignored, recomputed, and the file is good again
        assert run() == first
    assert len(calls) == 12
    assert [p.name for p in file.parent.iterdir()] == ["presets.json"]  # no temp files left


def _log_callback() -> int | None:
    cb, data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(cb), ctypes.byref(data))
    return ctypes.cast(cb, ctypes.c_void_p).value


def test_failures_say_which_preset_and_why(wide, narrow, tmp_path, capfd):
    before = _log_callback()
    with pytest.raises(UserError, match="preset IQ2_XXS: this quantization requires an imatrix"):
        P.llama_cpp_presets(*wide.args, presets=("Q8_0", "IQ2_XXS"), workdir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # no half set of files
    assert _log_callback() == before  # llama.cpp's logger is given back
    out, err = capfd.readouterr()
    assert "llama_model_quantize" not in out + err  # its log went nowhere
    with pytest.raises(UserError, match="unknown llama.cpp preset 'Q4_K_X'"):
        P.llama_cpp_presets(*narrow.args, presets=("Q4_K_X",))
    with pytest.raises(UserError, match="needs a workdir"):
        P.llama_cpp_presets(*narrow.args, keep_files=True)
    bad = {"model.layers.0.mlp.down_proj": np.ones(5, "f4")}
    with pytest.raises(UserError, match="down_proj: need 128 finite values"):
        P.llama_cpp_presets(*narrow.args, imatrix=bad)
    with pytest.raises(UserError, match="not searched tensors"):
        P.llama_cpp_presets(*narrow.args, imatrix={"model.norm": np.ones(64, "f4")})


def test_refuses_a_compressed_or_non_llama_model(narrow, monkeypatch):
    apply(narrow.model, Recipe.uniform("q8_0"), narrow.cache)
    try:
        with pytest.raises(UserError, match="apply the empty recipe"):
            P.llama_cpp_presets(*narrow.args, presets=("Q8_0",))
    finally:
        apply(narrow.model, Recipe(), narrow.cache)
    monkeypatch.setattr(narrow.model.config, "model_type", "gpt2")
    with pytest.raises(UserError, match="not a family llmpareto supports"):
        P.llama_cpp_presets(*narrow.args, presets=("Q8_0",))


def test_preset_label():
    assert P.preset_label("Q4_K_M") == "llama.cpp Q4_K_M"
    assert all(P.preset_label(p).startswith("llama.cpp ") for p in P.PRESETS)
