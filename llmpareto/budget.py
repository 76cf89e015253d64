"""Workload (what the device runs) and Budget (device + workload + limits)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    prompt_tokens: int = 128  # prefill length
    generated_tokens: int = 128  # decode steps (for totals; per-token metrics do not need it)
    batch: int = 1  # sequences decoded together
    context: int = 2048  # KV positions held in memory and read by each decoded token


@dataclass(frozen=True)
class Budget:
    device: str | None = None  # profile name or path; None: no device-specific cost
    workload: Workload = Workload()
    max_memory_bytes: int | None = None
    max_latency_ms: float | None = None  # per decoded token
    max_energy_mj: float | None = None  # per decoded token

    def constraints(self, metrics: dict[str, float]) -> dict[str, float]:
        """Optuna-style constraints (<= 0 feasible), relative so several add on one scale."""
        out = {}
        for key, limit in (("memory_bytes", self.max_memory_bytes),
                           ("latency_ms", self.max_latency_ms),
                           ("energy_mj", self.max_energy_mj)):
            if limit is not None:
                out[key] = metrics[key] / limit - 1.0
        return out
