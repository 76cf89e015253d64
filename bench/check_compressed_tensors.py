"""Check llmpareto's compressed-tensors sparse export against compressed-tensors 0.14.0.1, the
last release that still had the sparse compressors (0.15 removed them).

    python -m llmpareto.bench.check_compressed_tensors

compressed-tensors 0.14.0.1 requires transformers<5, so it cannot live in the environment: it
is installed (no dependencies) into its own folder, REFERENCE (tests/setup.sh, the README's
test command, does that; this command does it itself when the folder is missing). Then, in a
child process that imports it instead of the installed release, it prunes a tiny random Llama
(2:4 and 50% unstructured; float32, bfloat16, float16), writes it with
`llmpareto.export.compressed.write_compressed` and with the 0.14 library's own
`ModelCompressor.compress` + `save_pretrained`, and checks that (1) every tensor of the two
files is bit-identical, (2) the 0.14 library's `decompress` of our folder restores the pruned
weights bit for bit. Prints PASS/FAIL per case; exit status 1 on any failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CHILD = r'''
import sys, tempfile, torch
from pathlib import Path
import compressed_tensors, transformers
assert compressed_tensors.__version__.startswith("0.14"), compressed_tensors.__version__
from compressed_tensors import ModelCompressor
from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmpareto.compress.prune import prune
from llmpareto.export.compressed import write_compressed
from llmpareto.tiny import build_tiny_model

transformers.logging.set_verbosity_error()
tmp = Path(tempfile.mkdtemp())
src = build_tiny_model(tmp / "tiny")
tok = AutoTokenizer.from_pretrained(src)
bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
ok_all = True
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for pattern, level, cls in (("2:4", 0.0, Sparse24BitMaskConfig),
                                ("unstructured", 0.5, BitmaskConfig)):
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()
        pruned = {}
        with torch.no_grad():
            for name, mod in model.named_modules():
                if name.endswith("_proj"):
                    mod.weight.copy_(prune(mod.weight.float(), "magnitude", level, pattern))
                    pruned[name] = (pattern, level)
        ref = {k: v.clone() for k, v in model.state_dict().items()}
        ours = tmp / f"ours-{pattern.replace(':', '')}-{dtype}"
        fmt = write_compressed(ours, model, tok, pruned)
        ignore = [n for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and n not in pruned]
        zeros = sum(int((model.get_submodule(f).weight == 0).sum()) for f in pruned)
        total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        lib = tmp / f"lib-{pattern.replace(':', '')}-{dtype}"
        comp = ModelCompressor.from_pretrained_model(model, sparsity_config_or_format=cls(
            targets=["Linear"], ignore=ignore, global_sparsity=zeros / total,
            sparsity_structure="2:4" if pattern == "2:4" else "unstructured"))
        model.save_pretrained(lib, state_dict=comp.compress(model))
        a, b = load_file(ours / "model.safetensors"), load_file(lib / "model.safetensors")
        same = a.keys() == b.keys() and all(
            a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and
            torch.equal(a[k].view(bits.get(a[k].dtype, a[k].dtype)),
                        b[k].view(bits.get(b[k].dtype, b[k].dtype))) for k in a)
        back = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()
        with torch.no_grad():
            for p in back.parameters():
                p.normal_()  # a decompress that does nothing fails
        ModelCompressor.from_pretrained(str(ours)).decompress(str(ours), back)
        got = back.state_dict()
        # a tied head is not in either file; 0.14's decompress re-binds the embedding and leaves
        # the (scrambled) head behind, where transformers' loaders re-tie it
        tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        bad = [k for k in set(ref) - tied if got[k].is_floating_point() and not torch.equal(
            got[k].view(bits[got[k].dtype]), ref[k].view(bits[ref[k].dtype]))]
        restored = not bad
        ok = same and restored and fmt == ("sparse-24-bitmask" if pattern == "2:4" else
                                           "sparse-bitmask")
        ok_all &= ok
        print(f"{'PASS' if ok else 'FAIL'} {fmt:18s} {str(dtype):15s} tensors identical to the "
              f"0.14 writer: {same}; 0.14 decompress of ours bit-identical: {restored} {bad[:3] or ''}")
sys.exit(0 if ok_all else 1)
'''


VERSION = "0.14.0.1"
REFERENCE = Path(os.environ.get(
    "LLMPARETO_CT014", Path(__file__).resolve().parents[1] / ".refs" / f"compressed-tensors-{VERSION}"))
INSTALL = (f"python3 -m pip install --no-deps --upgrade --target {REFERENCE} "
           f"compressed-tensors=={VERSION}")


def installed() -> bool:
    return (REFERENCE / "compressed_tensors" / "__init__.py").is_file()


def run(reference: Path = REFERENCE) -> int:
    """The check against the reference folder (no install, no network); exit status."""
    env = {**os.environ, "PYTHONPATH": str(reference) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", CHILD], check=False, env=env).returncode


def main() -> int:
    if not installed():
        subprocess.run(INSTALL.split(), check=True)
    return run()
