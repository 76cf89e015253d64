"""Where a search's torch work runs: `--torch-device` and `--torch-dtype` resolved against this
machine (one-line errors before any load), and the memory a model needs there.

The torch device is a setting, not a code path: every apply/evaluate function runs on the
device its model's weights are on (`model_device`, `ids_on`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from llmpareto.errors import UserError

DEVICE_FORMS = "auto (CUDA when present), cpu, cuda, or cuda:N"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPE_FORMS = "auto (float32 on CPU, bfloat16 on CUDA), " + ", ".join(DTYPE_BYTES)
_DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d{1,3})?")


@dataclass(frozen=True)
class Placement:
    """A resolved device and dtype: where the base model, its variants and every forward
    pass live."""

    device: str  # "cpu" or "cuda:N"
    dtype: str  # float32 | bfloat16 | float16

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def torch_device(self):
        import torch

        return torch.device(self.device)

    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def to_dict(self) -> dict:
        return asdict(self)


CPU_FLOAT32 = Placement("cpu", "float32")


def check_device_spec(spec: object) -> str:
    """`spec` if it is one of the accepted forms (nothing about this machine yet)."""
    if not (isinstance(spec, str) and _DEVICE_RE.fullmatch(spec)):
        raise UserError(f"--torch-device {spec!r}: give {DEVICE_FORMS}")
    return spec


def check_dtype_spec(spec: object) -> str:
    if spec != "auto" and spec not in DTYPE_BYTES:
        raise UserError(f"--torch-dtype {spec!r}: give {DTYPE_FORMS}")
    return spec


def cuda_count() -> int:
    """CUDA devices torch can use here (0 without CUDA); one function, so tests can patch it."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _no_cuda_reason() -> str:
    import torch

    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"


def resolve(device: str = "auto", dtype: str = "auto") -> Placement:
    """The Placement `--torch-device` and `--torch-dtype` name on this machine, or a UserError
    saying what this machine has and what to pass instead."""
    check_device_spec(device)
    check_dtype_spec(dtype)
    n = cuda_count()
    if device == "auto":
        dev = "cuda:0" if n else "cpu"
    elif device == "cpu":
        dev = "cpu"
    else:
        index = int(device.partition(":")[2] or 0)
        if n == 0:
            raise UserError(f"--torch-device {device}: this machine has no CUDA GPU "
                            f"({_no_cuda_reason()}); use --torch-device cpu, or auto (CUDA when "
                            "present)")
        if index >= n:
            raise UserError(f"--torch-device {device}: this machine has {n} CUDA GPU"
                            f"{'s' if n > 1 else ''} (cuda:0{f'..cuda:{n - 1}' if n > 1 else ''})"
                            f"; pick one of them, or auto")
        dev = f"cuda:{index}"
    if dtype == "auto":
        dtype = "float32" if dev == "cpu" else "bfloat16" if _bf16_native(dev) else "float16"
    check_runs(dev, dtype)
    return Placement(dev, dtype)


def _bf16_native(dev: str) -> bool:
    import torch

    with torch.cuda.device(dev):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def check_runs(dev: str, dtype: str) -> None:
    """Refuse a dtype the device has no kernels for (a tiny matmul, softmax and attention
    probe: the operations a decoder forward pass needs), before anything is loaded."""
    import torch

    if dev.startswith("cuda") and dtype == "bfloat16" and not _bf16_native(dev):
        raise UserError(f"--torch-dtype bfloat16: {dev} ({torch.cuda.get_device_name(dev)}) has "
                        "no native bfloat16 (compute capability 8.0 or newer); use "
                        "--torch-dtype float16 or float32")
    t = getattr(torch, dtype)
    try:
        x = torch.ones(2, 4, 8, 16, device=dev, dtype=t)
        y = torch.nn.functional.linear(x, torch.ones(16, 16, device=dev, dtype=t))
        y = torch.nn.functional.scaled_dot_product_attention(y, y, y, is_causal=True)
        torch.softmax(y, dim=-1).float().sum().item()
    except (RuntimeError, NotImplementedError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"--torch-dtype {dtype}: {dev} cannot run {dtype} ({first}); use "
                        "--torch-dtype float32") from None


def model_device(model):
    """The device a model's weights are on (where its inputs must go)."""
    return next(model.parameters()).device


def ids_on(model, windows):
    """Token ids (a numpy array of windows) as a tensor on the model's device."""
    import torch

    return torch.from_numpy(windows).to(model_device(model))


def device_free_bytes(placement: Placement) -> int | None:
    """Free memory of a CUDA placement (torch.cuda.mem_get_info); None on the CPU, where the
    host's memory is the device's. One function, so tests can patch it."""
    if not placement.is_cuda:
        return None
    import torch

    return int(torch.cuda.mem_get_info(placement.torch_device())[0])


def peak_device_bytes(placement: Placement) -> int | None:
    """Most device memory torch held at once in this process (None on the CPU)."""
    if not placement.is_cuda:
        return None
    import torch

    return int(torch.cuda.max_memory_allocated(placement.torch_device()))


def release_freed_host_memory() -> bool:
    """Hand the host memory freed tensors left in the C allocator back to the system (glibc's
    malloc_trim). Tensors of a few MB that a cache drops are carved from the heap, not mapped,
    and glibc keeps their pages: a search cycling 4 GB of variants grew to 10 GB and more,
    though never more than the caches' bounds were live. False where there is no glibc."""
    import ctypes
    import ctypes.util

    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - glibc only
        except (OSError, AttributeError):
            _LIBC = False
    if not _LIBC:
        return False
    _LIBC.malloc_trim(0)
    return True


_LIBC = None  # the C library, once loaded (False: no malloc_trim here)


def node_share(resources: dict, cpus_per_trial: float, gpus_per_trial: float = 0.0,
               max_concurrent: int | None = None) -> float:
    """The part of a node's memory one trial's worker may plan its caches on: one over the
    trials Ray can run on that node at once (its CPUs, and GPUs for GPU trials, over what a
    trial asks; at most --max-concurrent). Each worker reads the memory available when it
    starts, before the others have filled their caches, so without it each would plan on
    most of the node."""
    fits = [float(resources.get("CPU", 0)) / cpus_per_trial] if cpus_per_trial > 0 else []
    if gpus_per_trial > 0:
        fits.append(float(resources.get("GPU", 0)) / gpus_per_trial)
    at_once = max(1, int(min(fits) + 1e-9)) if fits else 1
    if max_concurrent:
        at_once = min(at_once, int(max_concurrent))
    return 1.0 / at_once
