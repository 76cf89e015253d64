"""Quantizers: how a float32 weight becomes a format's packed bytes (a registry, `--quantizer`).

- `rtn`: llama.cpp's quantizer without calibration (round-to-nearest for the 32-weight block
  types and int*_g*, llama.cpp's own scale search for the K-quants).
- `imatrix`: llama.cpp's quantizer weighted by an importance matrix (per input column, the
  mean squared activation on calibration text: what `llama-imatrix` computes).
- `gptq`: GPTQ with error compensation onto the grid of q4_0..q8_0 and int*_g*, then packed
  by the format's own quantizer, which returns GPTQ's weights unchanged (exact).

Every quantizer depends only on the base weights and base-model calibration statistics, never
on other modules' choices, so each (module, format) variant is made once per run; calibrated
ones are also kept on disk (`DiskVariants`) so a second run on the same model skips the work.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from llmpareto import atomic
from llmpareto.errors import UserError
from llmpareto.formats import get_format

QUANTIZER_VERSION = 1  # bump when a quantizer's output changes: old disk variants are ignored


@dataclass
class Quantizer:
    """Round-to-nearest (llama.cpp's quantizer with no importance matrix)."""

    name: str = "rtn"
    calibrated = False

    def targets(self, fmt: str) -> bool:
        return True

    def calibrate(self, cache, calib: np.ndarray, cfg: dict) -> None:
        """Take what this quantizer needs from the base model (`cache.model`) on the
        calibration windows `calib`; `cfg` holds the run's quantizer settings (batch_size,
        imatrix, damp, act_order). Round-to-nearest needs nothing."""

    def calibrates(self, fmt: str) -> bool:
        """Whether `fmt` comes out differently from plain rounding (worth keeping on disk)."""
        return False

    def quantize(self, fqn: str, fmt: str, w: torch.Tensor, cols: torch.Tensor | None) -> np.ndarray:
        """Packed bytes of `w` (float32, rows x cols) in `fmt`; `cols` are the base model's
        input columns `w` keeps (a narrower student), None for all."""
        return get_format(fmt).quantize(w.numpy())

    def settings(self) -> dict:
        return {"quantizer": self.name}


@dataclass
class ImatrixQuantizer(Quantizer):
    """llama.cpp's quantizer with the importance matrix of each module's inputs."""

    name: str = "imatrix"
    calibrated = True
    imatrix: dict[str, np.ndarray] = field(default_factory=dict)  # fqn -> (cols,) float32
    source: str = "computed"  # or the imatrix file read

    def calibrate(self, cache, calib: np.ndarray, cfg: dict) -> None:
        self.imatrix = _imatrix(cache, calib, cfg["batch_size"], cfg["imatrix"])
        self.source = cfg["imatrix"]

    def calibrates(self, fmt: str) -> bool:
        return get_format(fmt).takes_imatrix

    def quantize(self, fqn: str, fmt: str, w: torch.Tensor, cols: torch.Tensor | None) -> np.ndarray:
        f = get_format(fmt)
        imx = self.imatrix.get(fqn) if f.takes_imatrix else None
        if imx is not None and cols is not None:
            imx = imx[cols.numpy()]
        return f.quantize(w.numpy(), imx)

    def settings(self) -> dict:
        digest = hashlib.sha256()
        for k in sorted(self.imatrix):
            digest.update(k.encode() + np.ascontiguousarray(self.imatrix[k]).tobytes())
        return {"quantizer": self.name, "imatrix_sha256": digest.hexdigest()}


@dataclass
class GPTQQuantizer(Quantizer):
    """GPTQ onto the format's grid from each module's x^T x (the factor is made once per module
    and input-column cut, and shared by every format)."""

    name: str = "gptq"
    calibrated = True
    stats: dict = field(default_factory=dict)  # fqn -> compress.prune.InputStats (full x^T x)
    damp: float = 0.01
    act_order: bool = True
    _factors: dict = field(default_factory=dict, repr=False)

    def targets(self, fmt: str) -> bool:
        from llmpareto.compress.gptq import GRIDS

        return fmt == "f16" or fmt in GRIDS

    def calibrate(self, cache, calib: np.ndarray, cfg: dict) -> None:
        from llmpareto.compress.calibration import quantizer_stats
        from llmpareto.compress.gptq import check_calibration_tokens

        check_calibration_tokens(int(calib.size), max(t.cols for t in cache.arch.tensors))
        self.stats = quantizer_stats(cache.model, cache.arch, calib, cfg["batch_size"], full=True)
        self.damp, self.act_order = float(cfg["damp"]), bool(cfg["act_order"])

    def calibrates(self, fmt: str) -> bool:
        return fmt != "f16" and self.targets(fmt)

    def quantize(self, fqn: str, fmt: str, w: torch.Tensor, cols: torch.Tensor | None) -> np.ndarray:
        from llmpareto.compress.gptq import gptq_quantize, prepare_hessian
        from llmpareto.compress.prune import InputStats

        f = get_format(fmt)
        if not self.targets(fmt) or fmt == "f16":  # a llama.cpp preset's K-quants: as llama.cpp
            return f.quantize(w.numpy())
        key = (fqn, None if cols is None else tuple(cols.tolist()))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # per-column steps are tiny: threads only contend (~8x slower)
        try:
            if key not in self._factors:
                s = self.stats[fqn]
                if cols is not None:
                    s = InputStats(s.xtx[cols][:, cols], s.tokens)
                self._factors = {k: v for k, v in self._factors.items() if k[0] == fqn}
                self._factors[key] = prepare_hessian(s, self.damp, self.act_order)
            q = gptq_quantize(w, self._factors[key], fmt)
        except ValueError:  # scales beyond float16: the format's own rounding, as llama.cpp
            return f.quantize(w.numpy())
        finally:
            torch.set_num_threads(threads)
        return f.quantize(q.numpy())

    def settings(self) -> dict:
        return {"quantizer": self.name, "damp": self.damp, "act_order": self.act_order}


QUANTIZERS = {"rtn": Quantizer, "imatrix": ImatrixQuantizer, "gptq": GPTQQuantizer}


def check_quantizer(name: str, formats: list[str] | None) -> None:
    """Refuse an unknown quantizer, or a format it cannot target, with one line."""
    if name not in QUANTIZERS:
        raise UserError(f"--quantizer {name!r}; choose one of {', '.join(QUANTIZERS)}")
    q = QUANTIZERS[name]()
    bad = [f for f in formats or [] if not q.targets(f)]
    if bad:
        ok = [f for f in _all_formats() if q.targets(f)]
        raise UserError(f"--quantizer {name} cannot target {', '.join(bad)}: it rounds onto the "
                        f"grids of {', '.join(ok)}; drop those formats or use --quantizer "
                        "imatrix (llama.cpp's own quantizer, every GGUF format)")


def _all_formats() -> list[str]:
    from llmpareto.formats import FORMATS

    return list(FORMATS)


def cache_root() -> Path:
    """Where calibrated variants are kept between runs: $LLMPARETO_CACHE, else
    $XDG_CACHE_HOME/llmpareto, else ~/.cache/llmpareto."""
    if os.environ.get("LLMPARETO_CACHE"):
        return Path(os.environ["LLMPARETO_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llmpareto"


class DiskVariants:
    """Packed variants on disk under `root/variants/<key>/`, the key a digest of everything
    they depend on (model weights, calibration text and windows, quantizer settings, llama.cpp
    version). Files are written to a temporary name and renamed, so a kill never leaves a
    half-written variant; an unreadable file is made again."""

    def __init__(self, root: Path, identity: dict) -> None:
        text = json.dumps({**identity, "version": QUANTIZER_VERSION}, sort_keys=True)
        self.key = hashlib.sha256(text.encode()).hexdigest()[:24]
        self.folder = Path(root) / "variants" / self.key
        self.identity = identity
        self.loaded = self.saved = 0

    def _path(self, key: tuple) -> Path:
        return self.folder / (hashlib.sha1(repr(key).encode()).hexdigest()[:20] + ".npy")

    def load(self, key: tuple) -> np.ndarray | None:
        path = self._path(key)
        if not path.exists():
            return None
        try:
            out = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None
        self.loaded += 1
        return out

    def save(self, key: tuple, value: np.ndarray) -> None:
        try:
            if not self.folder.exists():
                self.folder.mkdir(parents=True, exist_ok=True)
                atomic.write_text(self.folder / "identity.json",
                                  json.dumps(self.identity, indent=1))
            path = self._path(key)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as fh:
                np.save(fh, value, allow_pickle=False)
            os.replace(tmp, path)
            self.saved += 1
        except OSError:  # a full or read-only disk only costs the next run the work again
            pass


def setup_quantizer(cache, calib: np.ndarray, text_sha256: str, *, quantizer: str,
                    imatrix: str = "on", batch_size: int = 4, window: int = 256,
                    damp: float = 0.01, act_order: bool = True,
                    disk_cache: str | None = None) -> float:
    """Give `cache` (its model in the base state) the quantizer a run asked for, with its
    calibration: the importance matrix (from the calibration windows `calib`, or read from an
    imatrix file and checked against this model) or GPTQ's x^T x; calibrated variants are kept
    on disk. The search and `pick` both call this, so an export quantizes as its run did.
    Returns the seconds spent."""
    import time

    t0 = time.perf_counter()
    q = QUANTIZERS[quantizer]()
    q.calibrate(cache, calib, {"batch_size": batch_size, "imatrix": imatrix, "damp": damp,
                               "act_order": act_order})
    disk = None
    if q.calibrated and disk_cache != "off":
        disk = DiskVariants(Path(disk_cache) if disk_cache else cache_root(), {
            "model": cache.fingerprint(), "text": text_sha256, "window": window,
            "calib_windows": len(calib), "batch_size": batch_size,
            "versions": _quant_versions(), **q.settings()})
    cache.set_quantizer(q, disk)
    return time.perf_counter() - t0


def _imatrix(cache, calib: np.ndarray, batch_size: int, imatrix: str) -> dict:
    """fqn -> importance per input column (mean squared activation)."""
    from llmpareto.compress import imatrix as im
    from llmpareto.compress.calibration import quantizer_stats

    arch = cache.arch
    if imatrix == "on":
        return im.imatrix_from_stats(quantizer_stats(cache.model, arch, calib, batch_size, False))
    raw = im.read_imatrix(imatrix)
    shapes = {t.fqn: (t.rows, t.cols) for t in arch.tensors}
    from llmpareto.families import gguf_arch_of

    im.check_imatrix(raw, shapes, imatrix, n_blocks=arch.n_layers,
                     gguf_arch=gguf_arch_of(arch))
    return im.to_modules(raw, shapes, arch.n_layers, gguf_arch_of(arch))


def _quant_versions() -> dict[str, str | None]:
    from llmpareto.versions import package_versions

    v = package_versions()
    return {k: v.get(k) for k in ("llama-cpp-python", "gguf", "torch")}
