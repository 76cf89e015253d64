"""Every option of a search as data, strict and serializable (run.json holds it), with the
checks of each value's form (types, ranges, units, names). The checks that read other parts'
registries (quantizers, strategies, presets) are search.settings.SearchSettings', which is what
a search runs with.

CLI flags map one to one onto these fields (`--max-memory` -> `max_memory`), and so do the
keyword arguments of `llmpareto.search(...)`.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from llmpareto.errors import UserError

SETTINGS_VERSION = 1
DEFAULT_STRATEGY = "auto"  # docs/strategies.md: what the benchmark favoured
# Options that may differ between a run and its --resume (they do not change what is searched).
RESUMABLE = {"trials", "resume", "runs_dir", "progress", "study", "version", "dequant_cache",
             "variant_cache", "disk_cache",
             "batch_size", "address", "cpus_per_trial", "max_concurrent", "storage",
             "create_only", "sensitivity", "sampler", "torch_device", "gpus_per_trial",
             "recover_steps", "recover_rounds", "recover_tokens", "recover_method",
             "recover_here"}
# A study name is a folder under --runs-dir: nothing that could name a path elsewhere.
_STUDY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_study(name: object) -> str:
    """`name` if it is one plain folder name, else UserError saying what is allowed."""
    if not (isinstance(name, str) and _STUDY_RE.fullmatch(name) and ".." not in name):
        raise UserError(
            f"--study {name!r}: use letters, digits, '.', '_' and '-' only, starting with a "
            "letter or digit, at most 100 characters (no path separators, '..', NUL or leading "
            "dot); the run goes to --runs-dir/<study>/")
    return name


@dataclass
class SettingsForm:
    model: str = "smollm2-135m"  # embedded default; or a path / cached hub id
    allow_pickle: bool = False  # pickle checkpoints can run code: opt in only
    text: list[str] | None = None  # None: CPython docs (pydoc_data.topics)
    window: int = 256  # tokens per evaluation/calibration window
    calib_tokens: int = 512  # for KL to the base model
    eval_tokens: int = 1024  # for perplexity; few enough that a trial takes seconds
    # a text of another domain the run never calibrates or trains on: the front (and what
    # recovery makes) is measured on it after the trials; a file, the shipped default, or none
    eval_text: str = "python-license"
    eval_text_tokens: int = 1024
    # recovery after the trials (docs/recovery.md): 0 = off; steps of the first round
    recover_steps: int = 0
    recover_rounds: int = 2  # successive halving: round r runs recover_steps * 2**r steps
    recover_tokens: int = 4096  # calibration tokens recovery learns on (the text less eval)
    recover_method: str = "auto"  # auto (by what a candidate changed) | a compress.recovery name
    # a text of a third domain (neither --text nor --eval-text) that nothing learns on: a
    # point keeps recovered weights only when they are also no further from the base model on
    # it (docs/recovery.md); the shipped python-source, a file, or none
    recover_guard: str = "python-source"
    # --storage: whether the search process recovers points too, or only hands them to the
    # workers of the study (a coordinator on a machine without the accelerator)
    recover_here: bool = True
    space: str = "formats"
    formats: list[str] | None = None  # None: the GGUF formats, so every point exports
    granularity: str = "type"  # type: one format per projection kind; block; module
    quantizer: str = "imatrix"  # rtn | imatrix | gptq (compress.quantizers; docs/formats-and-quantizers.md)
    imatrix: str = "on"  # on: from the calibration windows; off; or a llama.cpp imatrix file
    gptq_damp: float = 0.01  # --quantizer gptq: damping, a fraction of mean(diag(x^T x))
    gptq_act_order: bool = True  # --quantizer gptq: columns by descending activation energy
    disk_cache: str | None = None  # calibrated variants kept between runs; None: ~/.cache/..
    presets: list[str] | None = None  # llama.cpp presets enqueued as baselines; None: all 8
    sparsity_method: str = "wanda"  # magnitude | wanda | sparsegpt (--space ...sparsity)
    sparsity_pattern: str = "unstructured"  # or N:M, e.g. 2:4: per group dense or N:M
    sparsity_levels: list[float] | None = None  # unstructured levels; None: 0, 0.1, ..., 0.7
    student_blocks: list[int] | None = None  # --space ...students: blocks kept; None: 100-70%
    student_mlp_ratios: list[float] | None = None  # MLP width kept; None: 1, 0.875, 0.75, 0.5
    student_heads: list[int] | None = None  # KV groups kept per block; None: every count
    # model: one MLP width and KV-group count for every block; block: one per kept block
    student_granularity: str = "model"
    objectives: list[str] = field(default_factory=lambda: ["perplexity", "memory_bytes"])
    max_memory: int | None = None  # bytes; candidates above never pay for a forward pass
    device: str = "raspberry-pi-5"  # profile name, TOML path, or "host" (measured here)
    max_latency_ms: float | None = None  # per decoded token on --device
    max_energy_mj: float | None = None  # per decoded token on --device
    context: int = 2048  # tokens of KV cache: counted in memory, read by each decoded token
    prompt_tokens: int = 128  # prefill length for prefill_ms and activation buffers
    strategy: str | None = None  # nsga2|tpe|random|knapsack|evolve|auto; None: DEFAULT_STRATEGY
    sampler: str | None = None  # the flag's old name (nsga2, tpe, random): an alias of strategy
    sweep: int | None = None  # knapsack/evolve: budgets seeded; None: by strategy and --trials
    repair: bool = True  # lower an over-budget proposal on its least sensitive keys (HAQ)
    sensitivity: str | None = None  # a sensitivity.json to reuse; None: measured (cached in RUN)
    sensitivity_tokens: int = 128  # calibration tokens each sensitivity KL is measured on
    population: int | None = None  # NSGA-II population; None: about trials/8, 8..50
    trials: int = 30  # completed trials wanted, baselines included (knapsack seeds cover the budgets)
    study: str | None = None  # None: <model>-<timestamp>
    runs_dir: str = "runs"
    resume: bool = False
    seed: int = 0
    batch_size: int = 4  # windows per forward pass
    # Where trials run (docs/gpus-and-memory.md); the dtype changes scores, the device not
    torch_device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N
    torch_dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA | float32 | bfloat16 | float16
    dequant_cache: int = 4 * 10**9  # bytes of dequantized variants kept (LRU) between trials
    variant_cache: int = 4 * 10**9  # bytes of packed codes and pruned weights kept (LRU)
    baselines: bool = True  # enqueue uniform recipes first
    country: str = "USA"  # ISO code for codecarbon's offline CO2 intensity
    progress: bool = True
    # Distributed search (docs/distributed.md); none of these changes what is searched.
    address: str | None = None  # --backend ray: "auto", HOST:PORT; None starts Ray here
    cpus_per_trial: float = 1.0  # Ray resources per trial (and torch threads in the worker)
    gpus_per_trial: float = 0.0  # Ray GPUs per trial (fractions share one); > 0: trials on CUDA
    max_concurrent: int | None = None  # Ray trials at once; None: as many as CPUs allow
    storage: str | None = None  # SQLAlchemy URL of a study shared with `llmpareto worker`s
    create_only: bool = False  # with --storage: create the study and return (workers run it)
    version: int = SETTINGS_VERSION

    def __post_init__(self) -> None:
        from llmpareto.metrics import metric_names
        from llmpareto.units import parse_bytes

        if isinstance(self.text, str):
            self.text = [self.text]
        if isinstance(self.formats, str):
            self.formats = [f.strip() for f in self.formats.split(",") if f.strip()]
        self.objectives = metric_names(self.objectives)
        if len(self.objectives) < 2:
            raise UserError("--objectives needs two or more metrics for a Pareto front, e.g. "
                            "perplexity,memory_bytes")
        if self.max_memory is not None:
            self.max_memory = parse_bytes(self.max_memory, "--max-memory")
        self.dequant_cache = parse_bytes(self.dequant_cache, "--dequant-cache")
        self.variant_cache = parse_bytes(self.variant_cache, "--variant-cache")
        for name in ("max_latency_ms", "max_energy_mj"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or value <= 0):
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    value = -1.0
                if value <= 0:
                    raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)!r} must be "
                                    "a positive number")
                setattr(self, name, value)
        for name in ("window", "eval_tokens", "context", "trials", "batch_size", "prompt_tokens"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if float(self.cpus_per_trial) <= 0:
            raise UserError("--cpus-per-trial must be a positive number, e.g. 1 or 0.5")
        self.cpus_per_trial = float(self.cpus_per_trial)
        self._check_placement()
        if self.max_concurrent is not None and int(self.max_concurrent) < 1:
            raise UserError("--max-concurrent must be at least 1")
        if self.calib_tokens < 0:
            raise UserError("--calib-tokens must be 0 or more")
        self._check_recovery()
        self._check_sparsity()
        self._check_students()
        self.check_parts()
        if self.study is None:
            stem = re.sub(r"[^A-Za-z0-9._-]+", "-", self.model.rstrip("/").split("/")[-1])
            stem = re.sub(r"\.{2,}", ".", stem)[:80]  # a default name always passes check_study
            self.study = f"{stem.strip('-._') or 'model'}-{time.strftime('%Y%m%d-%H%M%S')}"
        check_study(self.study)

    def _check_recovery(self) -> None:
        for name, least, what in (("recover_steps", 0, "0 (no recovery) or more steps"),
                                  ("recover_rounds", 1, "1 or more rounds"),
                                  ("recover_tokens", 2, "2 or more calibration tokens"),
                                  ("eval_text_tokens", 1, "1 or more tokens")):
            value = getattr(self, name)
            try:
                ok = float(value) == int(value) and int(value) >= least
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise UserError(f"--{name.replace('_', '-')} {value!r}: give {what}")
            setattr(self, name, int(value))
        if self.eval_text in (None, "", "None"):
            self.eval_text = "none"
        if self.recover_guard in (None, "", "None"):
            self.recover_guard = "none"
        if not self.recover_here and self.recover_steps and not self.storage:
            raise UserError("--no-recover-here leaves recovery to the workers of a shared "
                            "study: give --storage URL too, or drop --no-recover-here")

    def _check_placement(self) -> None:
        """The forms of --torch-device/--torch-dtype; whether this machine has them is checked
        where the model loads (placement.resolve), on the worker that loads it."""
        from llmpareto.placement import check_device_spec, check_dtype_spec

        check_device_spec(self.torch_device)
        check_dtype_spec(self.torch_dtype)
        try:
            self.gpus_per_trial = float(self.gpus_per_trial)
        except (TypeError, ValueError):
            self.gpus_per_trial = -1.0
        if not 0 <= self.gpus_per_trial < 1e6:
            raise UserError("--gpus-per-trial must be 0 (CPU trials) or a positive number of "
                            "GPUs, e.g. 1 or 0.5 (two trials share a GPU)")

    def _check_sparsity(self) -> None:
        from llmpareto.recipe import NEEDS_CALIBRATION, PRUNING_METHODS, parse_pattern

        if self.sparsity_method not in PRUNING_METHODS:
            raise UserError(f"--sparsity-method {self.sparsity_method!r}; choose one of "
                            f"{', '.join(PRUNING_METHODS)}")
        parse_pattern(self.sparsity_pattern)
        levels = self.sparsity_levels
        if isinstance(levels, str):
            try:
                levels = [float(v) for v in levels.split(",") if v.strip()]
            except ValueError:
                raise UserError(f"--sparsity-levels {self.sparsity_levels!r}: give numbers "
                                "like 0,0.25,0.5") from None
        if levels is not None:
            bad = [v for v in levels if not 0 <= float(v) < 1]
            if bad or not levels:
                raise UserError(f"--sparsity-levels {self.sparsity_levels!r}: every level must "
                                "be in [0, 1), e.g. 0,0.25,0.5")
            self.sparsity_levels = sorted({float(v) for v in levels})
        spaces = [n.strip() for n in str(self.space).split(",")]
        if ({"formats", "sparsity"} <= set(spaces) and self.formats is None
                and parse_pattern(self.sparsity_pattern) is not None):
            from llmpareto.formats import GGUF_FORMATS, get_format

            # N:M must survive quantization: the default formats minus asymmetric ones
            self.formats = [f for f in GGUF_FORMATS if get_format(f).keeps_zeros]
        if ("sparsity" in spaces and self.sparsity_method in NEEDS_CALIBRATION
                and self.calib_tokens == 0):
            raise UserError(f"--sparsity-method {self.sparsity_method} prunes from calibration "
                            "activations: set --calib-tokens > 0, or use --sparsity-method "
                            "magnitude")

    def check_parts(self) -> None:
        """The checks across parts (search.settings.SearchSettings); none for the form."""

    def _check_students(self) -> None:
        for name, kind in (("student_blocks", int), ("student_mlp_ratios", float),
                           ("student_heads", int)):
            value = getattr(self, name)
            if value is None:
                continue
            flag = "--" + name.replace("_", "-")
            try:
                items = value.split(",") if isinstance(value, str) else list(value)
                parsed = [kind(float(v)) if kind is int else kind(v) for v in items
                          if str(v).strip()]
                if kind is int and any(float(v) != int(float(v)) for v in items if str(v).strip()):
                    raise ValueError
            except (TypeError, ValueError):
                raise UserError(f"{flag} {value!r}: give comma-separated "
                                f"{'whole numbers' if kind is int else 'numbers'}") from None
            if not parsed:
                raise UserError(f"{flag} needs at least one value")
            setattr(self, name, parsed)
        spaces = [n.strip() for n in str(self.space).split(",")]
        if self.student_granularity not in ("model", "block"):
            raise UserError(f"--student-granularity {self.student_granularity!r}: use model (one "
                            "MLP width and KV-group count for every block) or block (one per "
                            "kept block)")
        if self.student_granularity == "block" and "students" not in spaces:
            raise UserError("--student-granularity block cuts student blocks one by one: add "
                            "students to --space, e.g. --space formats,students")
        if self.student_granularity == "block" and self.calib_tokens == 0:
            raise UserError("--student-granularity block ranks each block's MLP channels and "
                            "attention groups on calibration text: set --calib-tokens > 0")
        if "students" in spaces and self.calib_tokens == 0:
            raise UserError("--space ...students ranks blocks, MLP channels and attention groups "
                            "on calibration text: set --calib-tokens > 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SettingsForm:
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise UserError(f"unknown search setting(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    def identity(self) -> dict[str, Any]:
        """The settings that decide what is searched; a --resume must match them."""
        return {k: v for k, v in self.to_dict().items() if k not in RESUMABLE}
