"""pick / front: exported GGUF and HF files are the searched model, and run for real."""

import json

import gguf
import numpy as np
import pytest
import torch

import llmpareto
from llmpareto.cli import main
from llmpareto.errors import UserError
from llmpareto.export.pick import pick
from llmpareto.gguf_write import gguf_name, unpermute_rows
from llmpareto.query import where
from llmpareto.search.workbench import Workbench


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    front = llmpareto.search(model=str(tiny_model_dir), runs_dir=str(runs), study="e", window=64,
                             eval_tokens=256, calib_tokens=0, trials=12, progress=False,
                             context=512, granularity="module", seed=1, quantizer="rtn")
    return runs / "e", front


def _mixed_trial(front):
    """A front point whose recipe mixes several formats (the interesting case to export)."""
    best = None
    for t in front.df["trial"]:
        n = len({c.get("format") for c in front.recipe(int(t)).modules.values()})
        if best is None or n > best[0]:
            best = (n, int(t))
    return best[1]


def test_gguf_export_is_bit_identical_and_runs_in_llama_cpp(run, tmp_path):
    from llmpareto.evaluators.llamacpp import gguf_perplexity

    run_dir, front = run
    trial = _mixed_trial(front)
    out = pick(run_dir, tmp_path / "x", trial=trial, formats="gguf")
    rb = Workbench.from_run(run_dir)
    built = rb.build(front.recipe(trial))
    cfg = built.model.config
    reader = gguf.GGUFReader(out / "model.gguf")
    tensors = {t.name: t for t in reader.tensors}
    types = set()
    for name, p in built.model.named_parameters():
        t = tensors[gguf_name(name, cfg.num_hidden_layers)]
        types.add(t.tensor_type.name)
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(p.shape)
        if "q_proj" in name:
            w = unpermute_rows(w, cfg.num_attention_heads)
        if "k_proj" in name:
            w = unpermute_rows(w, cfg.num_key_value_heads)
        assert np.array_equal(w.view(np.uint32), p.detach().numpy().view(np.uint32)), name
    assert len(types - {"F32"}) >= 2  # really mixed precision
    searched = float(front.df.set_index("trial").loc[trial, "perplexity"])
    measured = gguf_perplexity(str(out / "model.gguf"), rb.windows.eval)
    assert abs(measured - searched) / searched < 0.01


def test_hf_export_reloads_with_the_same_logits(run, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir, front = run
    trial = _mixed_trial(front)
    out = pick(run_dir, tmp_path / "h", trial=trial, formats="hf")
    assert not (out / "model.gguf").exists() and (out / "README.md").is_file()
    card = (out / "README.md").read_text()
    assert f"trial {trial}" in card and "llmpareto pick" in card and "perplexity" in card
    rb = Workbench.from_run(run_dir)
    built = rb.build(front.recipe(trial))
    reloaded = AutoModelForCausalLM.from_pretrained(out / "hf", local_files_only=True)
    ids = torch.from_numpy(rb.windows.eval[:2])
    _same_weights_and_logits(reloaded, built.model, ids)
    assert json.loads((out / "hf" / "recipe.json").read_text())["version"] == 1


def _same_weights_and_logits(reloaded, model, ids) -> None:
    """Every weight bit-identical; logits within 1e-5 (two model objects may run different
    BLAS paths, e.g. by memory alignment, whose float sums round differently on some CPUs)."""
    ours = model.state_dict()
    theirs = reloaded.state_dict()
    assert set(theirs) == set(ours)
    for name, p in theirs.items():
        assert torch.equal(p, ours[name]), name
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_formats_gguf_cannot_hold_export_to_hf_only(tiny_model_dir, tmp_path):
    front = llmpareto.search(model=str(tiny_model_dir), runs_dir=str(tmp_path), study="i",
                             window=64, eval_tokens=128, calib_tokens=0, trials=2,
                             progress=False, context=256, formats="int4_g64,int8_g64",
                             quantizer="rtn")
    trial = int(front.df["trial"].iloc[0])
    with pytest.raises(UserError, match="GGUF cannot hold.*--format hf"):
        pick(tmp_path / "i", tmp_path / "o", trial=trial, formats="gguf")
    assert not (tmp_path / "o").exists()
    pick(tmp_path / "i", tmp_path / "o", trial=trial, formats="hf")
    assert (tmp_path / "o" / "hf" / "model.safetensors").is_file()


def test_pick_refuses_bad_requests(run, tmp_path, capsys):
    run_dir, front = run
    trial = int(front.df["trial"].iloc[0])
    off = sorted(set(front.trials["trial"]) - set(front.df["trial"]))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    code = main(["pick", str(run_dir), "--trial", str(trial), "--out", str(tmp_path / "full")])
    assert code == 2 and "--force" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    code = main(["pick", str(run_dir), "--trial", "999", "--out", str(tmp_path / "n")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    if off:
        code = main(["pick", str(run_dir), "--trial", str(off[0]), "--out", str(tmp_path / "n")])
        err = capsys.readouterr().err
        assert code == 2 and "nearest front point" in err and "--trial" in err
    code = main(["pick", str(run_dir), "--best", "perplexity", "--where", "nope > 1",
                 "--out", str(tmp_path / "n")])
    assert code == 2 and "unknown column 'nope'" in capsys.readouterr().err
    assert main(["pick", str(run_dir), "--trial", str(trial), "--out", str(tmp_path / "full"),
                 "--format", "gguf", "--force"]) == 0
    assert not (tmp_path / "full" / "keep.txt").exists()


def test_pick_removes_a_killed_picks_folder(run, tmp_path, dead_pid):
    """A pick killed mid-export leaves `.<out>.<pid>.*.tmp` beside --out; the next pick of the
    same --out removes it (its writer is dead) and leaves the user's other files alone."""

    run_dir, front = run
    dead = dead_pid
    half = tmp_path / f".o.{dead}.k1ll3d.tmp"
    half.mkdir()
    (half / "model.gguf").write_bytes(b"GGUF half")
    mine = tmp_path / f".notes.{dead}.a.tmp"
    mine.write_text("not llmpareto's")
    assert main(["pick", str(run_dir), "--trial", str(int(front.df["trial"].iloc[0])),
                 "--out", str(tmp_path / "o"), "--format", "gguf"]) == 0
    assert not half.exists() and mine.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["o", mine.name])


@pytest.mark.parametrize("expr", ["__import__('os').system('true')", "perplexity.real > 1",
                                  "open('x') == 1", "[c for c in 'ab']", "perplexity < (1).bit_length()",
                                  "lambda: 1", "perplexity <"])
def test_where_never_runs_code(expr):
    import pandas as pd

    with pytest.raises(UserError, match="--where"):
        where(pd.DataFrame({"perplexity": [1.0, 2.0]}), expr)


def test_where_filters():
    import pandas as pd

    df = pd.DataFrame({"latency_ms": [10, 20, 30], "memory_bytes": [3e8, 1e8, 2e8],
                       "baseline": ["uniform f16", "", ""]})
    assert where(df, "latency_ms<=20 and memory_bytes<=150e6").index.tolist() == [1]
    assert where(df, "latency_ms < 15 or not memory_bytes > 1.5e8").index.tolist() == [0, 1]
    assert where(df, "10 < latency_ms <= 30").index.tolist() == [1, 2]
    assert where(df, "baseline == 'uniform f16'").index.tolist() == [0]


def test_front_command_formats_plot_and_measure(run, tmp_path, capsys):
    run_dir, front = run
    assert main(["front", str(run_dir), "--format", "json", "--sort", "perplexity"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["trial"] for r in rows] == front.df.sort_values("perplexity")["trial"].tolist()
    assert main(["front", str(run_dir), "--where", "perplexity > 0", "--plot",
                 str(tmp_path / "f.html"), "--measure"]) == 0
    out = capsys.readouterr().out
    assert "measured_latency_ms" in out and "measured_perplexity" in out
    assert "<img src='data:image/png;base64," in (tmp_path / "f.html").read_text()
    assert list((run_dir / "exports").glob("trial-*.gguf"))


def test_student_with_fewer_blocks_exports_and_runs_in_llama_cpp(tiny_model_dir, tmp_path):
    """A recipe that keeps only some blocks (what the student space proposes): its cost sees
    fewer layers, its GGUF has fewer blocks, and llama.cpp runs it with the same perplexity."""
    from transformers import AutoModelForCausalLM

    from llmpareto.evaluators import Candidate, MemoryEvaluator
    from llmpareto.evaluators.llamacpp import gguf_perplexity
    from llmpareto.export.hf import write_hf
    from llmpareto.gguf_write import write_gguf
    from llmpareto.recipe import Recipe

    rb_dir = tmp_path / "run"
    llmpareto.search(model=str(tiny_model_dir), runs_dir=str(tmp_path), study="run", window=64,
                     eval_tokens=128, calib_tokens=0, trials=1, progress=False, context=256,
                     quantizer="rtn")
    rb = Workbench.from_run(rb_dir)
    full = rb.cache.arch
    student = Recipe({"_default": {"format": "q8_0"}}, structure={"layers": [1]})
    built = rb.build(student)
    assert len(built.model.model.layers) == 1 and built.model.config.num_hidden_layers == 1
    mem = MemoryEvaluator(full).evaluate(Candidate(student, built.formats))
    mem_full = MemoryEvaluator(full).evaluate(Candidate(Recipe.uniform("q8_0"),
                                                        full.formats_for(Recipe.uniform("q8_0"))))
    assert mem["kv_cache_bytes"] == mem_full["kv_cache_bytes"] / 2
    assert mem["weights_bytes"] < mem_full["weights_bytes"]
    windows = rb.windows.eval
    ids = torch.from_numpy(windows)
    with torch.no_grad():
        logits = built.model(ids).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                            ids[:, 1:].reshape(-1))
    path = write_gguf(tmp_path / "s.gguf", built.model, built.cache, built.formats,
                      built.source, built.tokenizer)
    reader = gguf.GGUFReader(path)
    assert reader.fields["llama.block_count"].contents() == 1
    assert not any(t.name.startswith("blk.1.") for t in reader.tensors)
    measured = gguf_perplexity(str(path), windows)
    assert abs(measured - float(torch.exp(nll))) / float(torch.exp(nll)) < 0.01
    write_hf(tmp_path / "hf", built)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert again.config.num_hidden_layers == 1
    _same_weights_and_logits(again, built.model, ids)
    rb.build(Recipe.uniform("q8_0"))  # and back to every block
    assert len(built.model.model.layers) == 2


def test_decode_is_timed_with_llama_benchs_loop_on_the_real_kv_cache(run, tmp_path):
    """bench_decode (llama-bench's token loop through the C API, what llama.cpp profiles are
    calibrated with) really decodes: after prompt + 12 timed tokens, llama.cpp's next-token
    logits are those of the same 22 tokens evaluated at once (a loop that skipped decoding, or
    decoded other tokens, gives other logits), and `Llama.eval` continues after them."""
    import llama_cpp

    from llmpareto.evaluators.llamacpp import _llama, bench_decode
    from llmpareto.gguf_write import write_gguf
    from llmpareto.recipe import Recipe

    rb = Workbench.from_run(run[0])
    built = rb.build(Recipe.uniform("q8_0"))
    path = write_gguf(tmp_path / "m.gguf", built.model, built.cache, built.formats,
                      built.source, built.tokenizer)
    toks = [int(t) for t in rb.windows.eval[0][:23]]

    def last_logits(llm) -> np.ndarray:
        n = llm.n_vocab()
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1),
                                     shape=(n,)).copy()

    timed = _llama(str(path), 64, 1)
    timed.eval(toks[:10])
    seconds = bench_decode(timed, toks[10:22])
    assert seconds > 0 and timed.n_tokens == 22
    got = last_logits(timed)
    at_once = _llama(str(path), 64, 1)
    at_once.eval(toks[:22])
    want = last_logits(at_once)
    other = _llama(str(path), 64, 1)
    other.eval(toks[:10] + toks[11:23])  # one token left out: another context
    scale = float(np.abs(want).max())
    assert np.abs(got - want).max() < 1e-2 * scale
    assert np.abs(last_logits(other) - want).max() > 5e-2 * scale
    timed.eval(toks[22:23])  # the high-level object continues where the loop stopped
    assert timed.n_tokens == 23
