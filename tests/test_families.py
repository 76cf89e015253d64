"""Conformance suite: every model family llmpareto supports (llmpareto.families), each as a tiny
random model built offline from its transformers config (llmpareto.tiny.FAMILY_MODELS) with a
locally trained tokenizer, put through what a user does with it:

- a formats search runs, on windows cut as the model runs (BOS first exactly when the model's
  own tokenizer puts it first);
- `pick` exports a front point: the GGUF loads in the vendored llama.cpp (llama-cpp-python), its
  logits on an evaluation window (BOS included where the family adds it) match the torch
  model's, and its add_bos_token says what the windows did; the HF export reloads with the
  same logits;
- per-tensor formats and a student (the structural cuts the family allows) export and match;
- the exported GGUF as a source: a search on it, then an export that keeps the source's
  architecture, metadata and tokenizer, and copies every tensor the recipe leaves alone byte for
  byte.

Tolerances (stated, CPU-independent): f16 weights, llama.cpp against torch float32: the largest
logit difference at most F16_TOL of the logits' standard deviation (llama.cpp rounds
activations to f16 there); quantized formats: perplexity within PPL_TOL and the mean logit
difference at most MEAN_TOL of the std (llama.cpp's quantized matmuls also round activations to
8 bits). `test_conformance_fails_when_bos_is_switched_off` shows the suite can fail.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import llmpareto
from llmpareto.errors import UserError
from llmpareto.families import FAMILIES, family_of
from llmpareto.recipe import Recipe
from llmpareto.tiny import FAMILY_MODELS, build_family_model

F16_TOL = 0.03  # max |logit difference| / std(logits), f16 weights
MEAN_TOL = 0.05  # mean |logit difference| / std(logits), quantized formats
PPL_TOL = 0.02  # relative perplexity difference, quantized formats
FAST = {"window": 64, "eval_tokens": 128, "calib_tokens": 128, "formats": "f16,q8_0,q4_0",
        "presets": "none", "progress": False}


def llama_cpp_logits(path: Path, window: np.ndarray) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=len(window), n_batch=len(window), logits_all=True,
                verbose=False, n_threads=2)
    try:
        llm.eval(window.tolist())
        return np.asarray(llm.scores[: len(window)], dtype=np.float64)
    finally:
        llm.close()


def torch_logits(model, window: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(input_ids=torch.tensor(window[None])).logits[0].double().numpy()


def ppl(logits: np.ndarray, window: np.ndarray) -> float:
    """Perplexity of window[1:] given logits (BOS, at position 0, is never a target)."""
    lg = logits[:-1]
    logz = np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1)) + lg.max(1)
    return math.exp(float((logz - lg[np.arange(len(lg)), window[1:]]).mean()))


def compare(path: Path, model, window: np.ndarray, quantized: bool) -> dict:
    ref, got = torch_logits(model, window), llama_cpp_logits(path, window)
    std = ref.std()
    out = {"max_rel": float(np.abs(ref - got).max() / std),
           "mean_rel": float(np.abs(ref - got).mean() / std),
           "ppl_torch": ppl(ref, window), "ppl_llama_cpp": ppl(got, window)}
    out["ppl_rel"] = abs(out["ppl_llama_cpp"] / out["ppl_torch"] - 1)
    if quantized:
        assert out["ppl_rel"] <= PPL_TOL and out["mean_rel"] <= MEAN_TOL, (path.name, out)
    else:
        assert out["max_rel"] <= F16_TOL, (path.name, out)
    return out


def student(name: str, n_layers: int) -> dict:
    """The cuts the family allows: a sliding and a full block where it has both kinds, a
    narrower MLP, one KV group."""
    fam = FAMILIES[family_of(build_config(name).model_type).name]
    s = {"layers": [0, n_layers - 1] if n_layers > 2 else [n_layers - 1], "mlp_ratio": 0.5,
         "heads": 1}
    return {k: v for k, v in s.items() if k in fam.cuts}


def build_config(name: str):
    import transformers

    from llmpareto.tiny import _BASE

    cls, extra, _ = FAMILY_MODELS[name]
    return getattr(transformers, cls)(**{**_BASE, **extra})


def tokenizer_adds_bos(tok) -> bool:
    """What the model's own tokenizer does (transformers, as users run it): the truth the
    windows are checked against."""
    ids = tok("def f(x): return x")["input_ids"]
    return tok.bos_token_id is not None and ids[0] == tok.bos_token_id


def conformance(name: str, tmp: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmpareto.export.pick import pick
    from llmpareto.gguf_write import write_gguf
    from llmpareto.search.workbench import Workbench

    folder = build_family_model(name, tmp / "model")
    tok = AutoTokenizer.from_pretrained(folder)
    adds_bos = tokenizer_adds_bos(tok)
    report = {"family": name, "adds_bos": adds_bos}

    # a formats search, on windows as the model runs
    front = llmpareto.search(model=str(folder), runs_dir=str(tmp / "runs"), study="hf",
                             trials=5, **FAST)
    run = tmp / "runs" / "hf"
    recorded = json.loads((run / "run.json").read_text())["text"]["windows"]
    assert recorded["bos_token_id"] == (tok.bos_token_id if adds_bos else None), recorded
    rb = Workbench.from_run(run)
    windows = rb.windows.eval
    assert bool((windows[:, 0] == tok.bos_token_id).all()) == adds_bos, windows[:, :3]
    window = windows[0]

    # pick a front point: GGUF in llama.cpp, HF reload
    trial = int(front.df.sort_values("memory_bytes")["trial"].iloc[0])
    out = pick(run, tmp / "pick", trial=trial)
    built = rb.build(Recipe.load(out / "recipe.json"))
    quantized = any(f not in (None, "f16") for f in built.formats.values())
    report["pick"] = compare(out / "model.gguf", built.model, window, quantized)
    meta = gguf.GGUFReader(str(out / "model.gguf")).fields
    assert bool(meta["tokenizer.ggml.add_bos_token"].contents()) == adds_bos
    assert str(meta["general.architecture"].contents()) == \
        FAMILIES[family_of(built.model.config.model_type).name].gguf_arch
    hf = AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    np.testing.assert_allclose(torch_logits(hf, window), torch_logits(built.model, window),
                               rtol=1e-4, atol=1e-4)

    # per-tensor formats, f16, a student
    recipes = {"f16": Recipe({"_default": {"format": "f16"}}),
               "per-tensor": Recipe({"_default": {"format": "q8_0"},
                                     "re:.*mlp.*": {"format": "q4_0"}}),
               "student": Recipe({"_default": {"format": "f16"}},
                                 structure=student(name, built.model.config.num_hidden_layers))}
    for label, recipe in recipes.items():
        b = rb.build(recipe)
        path = tmp / f"{label}.gguf"
        write_gguf(path, b.model, b.cache, b.formats, b.source, b.tokenizer)
        report[label] = compare(path, b.model, window, label == "per-tensor")
        if label == "student":
            from llmpareto.export.hf import write_hf

            write_hf(tmp / "student-hf", b)
            back = AutoModelForCausalLM.from_pretrained(tmp / "student-hf").eval()
            np.testing.assert_allclose(torch_logits(back, window), torch_logits(b.model, window),
                                       rtol=1e-4, atol=1e-4)
    report["student_structure"] = recipes["student"].structure

    # the f16 GGUF as a source: search it, export; the source's metadata and untouched tensors
    src = tmp / "f16.gguf"
    llmpareto.search(model=str(src), runs_dir=str(tmp / "runs"), study="gguf", trials=3, **FAST)
    rb2 = Workbench.from_run(tmp / "runs" / "gguf")
    w2 = rb2.windows.eval[0]
    assert (w2[0] == tok.bos_token_id) == adds_bos
    b2 = rb2.build(Recipe({"re:.*mlp.*": {"format": "q4_0"}}))
    again = tmp / "from-gguf.gguf"
    write_gguf(again, b2.model, b2.cache, b2.formats, b2.source, b2.tokenizer)
    report["from_gguf"] = compare(again, b2.model, w2, quantized=True)
    r_src, r_out = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(again))
    assert set(r_src.fields) - {"general.name"} <= set(r_out.fields)
    for key in ("general.architecture", "tokenizer.ggml.tokens", "tokenizer.ggml.add_bos_token"):
        assert r_out.fields[key].contents() == r_src.fields[key].contents(), key
    out_t = {t.name: t for t in r_out.tensors}
    assert [t.name for t in r_src.tensors] == list(out_t)
    changed = [t.name for t in r_src.tensors
               if np.asarray(t.data).tobytes() != np.asarray(out_t[t.name].data).tobytes()]
    assert changed and all(n.split(".")[-2].startswith("ffn_") for n in changed), changed
    return report


@pytest.mark.parametrize("name", list(FAMILY_MODELS))
def test_family_conforms(name, tmp_path):
    report = conformance(name, tmp_path)
    print(json.dumps(report))


def test_conformance_fails_when_bos_is_switched_off(monkeypatch, tmp_path):
    """The suite can fail: with BOS handling off, a family whose tokenizer puts BOS first is
    scored (and exported) without it, and conformance says so."""
    import llmpareto.text

    monkeypatch.setattr(llmpareto.text, "bos_token", lambda *args, **kwargs: None)
    with pytest.raises(AssertionError):
        conformance("llama3-tied", tmp_path)


@pytest.mark.parametrize("name, cut", [("phi3", {"heads": 1}), ("qwen2.5", {"heads": 1})])
def test_a_cut_the_family_cannot_take_is_refused_in_one_line(name, cut, tmp_path):
    from llmpareto.arch import Arch

    arch = Arch.from_config(build_config(name))
    with pytest.raises(UserError, match=f"the {arch.family} family cannot take this cut") as info:
        arch.restructure(cut)
    assert "\n" not in str(info.value)


def test_sliding_window_layers_hold_a_window_of_kv_cache():
    from llmpareto.arch import Arch
    from llmpareto.evaluators.cost import kv_cache_bytes

    arch = Arch.from_config(build_config("gemma3"))  # 5 sliding blocks of 16, 1 full
    assert arch.kv_windows == [16, 16, 16, 16, 16, 0]
    per_token = 2 * arch.n_kv_heads * arch.head_dim * 2  # K and V, f16
    assert kv_cache_bytes(arch, 2048) == per_token * (5 * 16 + 2048)
    assert kv_cache_bytes(arch, 8) == per_token * 6 * 8
    assert arch.restructure({"layers": [0, 5]}).kv_windows == [16, 0]
    llama = Arch.from_config(build_config("llama3-tied"))
    assert kv_cache_bytes(llama, 2048) == 2 * llama.n_layers * llama.n_kv_heads * \
        llama.head_dim * 2 * 2048


# ------------------------------------------------------------------------------ bad input

def _cli_error(argv: list[str]) -> str:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "llmpareto.cli", *argv], capture_output=True,
                         text=True, timeout=300, check=False)
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("llmpareto: error:")]
    assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr, \
        out.stderr[-2000:]
    return lines[0]


def _gguf_of_arch(path: Path, arch: str) -> Path:
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch, says", [
    ("frobnicator", "is not one llama.cpp knows"),
    ("bert", "(known to llama.cpp) is not a family llmpareto supports")])
def test_a_gguf_of_an_architecture_we_cannot_run_is_one_line(tmp_path, arch, says):
    path = _gguf_of_arch(tmp_path / f"{arch}.gguf", arch)
    line = _cli_error(["search", "--model", str(path), "--runs-dir", str(tmp_path / "runs")])
    assert repr(arch) in line and says in line and "gemma3" in line, line


def test_a_family_that_needs_bos_refuses_a_tokenizer_without_one(tmp_path):
    folder = build_family_model("gemma2", tmp_path / "model")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("bos_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    line = _cli_error(["search", "--model", str(folder), "--runs-dir", str(tmp_path / "runs")])
    assert "always puts a BOS token first" in line and str(folder) in line, line


def test_the_students_space_offers_only_the_cuts_the_family_allows():
    from llmpareto.arch import Arch
    from llmpareto.spaces.students import StudentSpace

    arch = Arch.from_config(build_config("phi3"))
    space = StudentSpace(arch)
    assert space.heads == [arch.n_kv_heads] and len(space.mlp_ratios) > 1
    with pytest.raises(UserError, match="--student-heads 1: the phi3 family cannot take"):
        StudentSpace(arch, heads=[1, 2])


@pytest.mark.parametrize("name", list(FAMILY_MODELS))
def test_arch_from_config_numbers_is_transformers_own(name):
    """The torch-free Arch of `llmpareto cost` equals the one read off transformers' model
    (built on the meta device) for every family, from the config.json as saved."""
    from llmpareto.arch import Arch
    from llmpareto.config_arch import arch_from_config

    cfg = build_config(name)
    assert arch_from_config(json.loads(cfg.to_json_string(use_diff=True))) == \
        Arch.from_config(cfg)


def test_a_quantized_gguf_source_keeps_the_tensors_a_recipe_leaves_alone(tmp_path):
    """A GGUF source whose tensors are quantized (as the default model's are: Q8_0 embeddings,
    Q4_1 linears): the export writes every tensor the recipe leaves alone byte for byte, in its
    own type, and llama.cpp runs it; llama.cpp's presets are made from a float32 file of the
    model (llama-quantize refuses to requantize)."""
    from llmpareto.gguf_write import write_gguf
    from llmpareto.search.workbench import Workbench
    from llmpareto.spaces.presets import quantize_presets

    folder = build_family_model("llama3-tied", tmp_path / "model")
    llmpareto.search(model=str(folder), runs_dir=str(tmp_path / "runs"), study="hf", trials=2,
                     **FAST)
    b = Workbench.from_run(tmp_path / "runs" / "hf").build(
        Recipe({"_default": {"format": "q8_0"}, "re:.*mlp.*": {"format": "q4_0"}}))
    src = tmp_path / "quantized.gguf"
    write_gguf(src, b.model, b.cache, b.formats, b.source, b.tokenizer)
    llmpareto.search(model=str(src), runs_dir=str(tmp_path / "runs"), study="q", trials=2,
                     **FAST)
    rb = Workbench.from_run(tmp_path / "runs" / "q")
    b2 = rb.build(Recipe({"re:.*mlp.*": {"format": "q8_0"}}))
    out = tmp_path / "export.gguf"
    write_gguf(out, b2.model, b2.cache, b2.formats, b2.source, b2.tokenizer)
    r_src, r_out = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(out))
    got = {t.name: t for t in r_out.tensors}
    kept = [t for t in r_src.tensors if not t.name.split(".")[-2].startswith("ffn_")]
    assert any(t.tensor_type == gguf.GGMLQuantizationType.Q8_0 for t in kept)
    for t in kept:
        assert got[t.name].tensor_type == t.tensor_type, t.name
        assert np.asarray(got[t.name].data).tobytes() == np.asarray(t.data).tobytes(), t.name
    compare(out, b2.model, rb.windows.eval[0], quantized=True)

    base = rb.build(Recipe({}))
    f32 = tmp_path / "f32.gguf"
    write_gguf(f32, base.model, base.cache, {}, base.source, base.tokenizer, all_f32=True)
    assert {int(t.tensor_type) for t in gguf.GGUFReader(str(f32)).tensors} == \
        {int(gguf.GGMLQuantizationType.F32)}
    compare(f32, base.model, rb.windows.eval[0], quantized=False)
    files = quantize_presets(base.model, base.cache, base.source, base.tokenizer,
                             tmp_path / "presets", presets=("Q8_0", "Q4_K_M"))
    assert sorted(files) == ["Q4_K_M", "Q8_0"] and all(p.is_file() for p in files.values())
