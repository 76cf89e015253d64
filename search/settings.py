"""SearchSettings: the settings a search runs with: the form checks of llmpareto.settings plus
the checks across parts, run before any load: the quantizer and its formats and importance
matrix (compress.quantizers), llama.cpp presets (spaces.presets), the strategy and its budgets
(search.strategies).
"""

from __future__ import annotations

from dataclasses import dataclass

from llmpareto.errors import UserError
from llmpareto.settings import DEFAULT_STRATEGY, SettingsForm


@dataclass
class SearchSettings(SettingsForm):
    def check_parts(self) -> None:
        self._check_quantizer()
        self._check_strategy()
        self._check_eval_text()

    def _check_eval_text(self) -> None:
        """--eval-text readable and another text than --text; with recovery, --recover-guard
        readable and another text than both; --recover-method known."""
        if self.eval_text != "none":
            from llmpareto.text import read_eval_text

            read_eval_text(self.eval_text, self.text)
        if self.recover_steps and self.recover_guard != "none":
            from llmpareto.text import DEFAULT_GUARD_TEXT, read_eval_text

            read_eval_text(self.recover_guard, self.text, flag="--recover-guard",
                           default=DEFAULT_GUARD_TEXT,
                           others=(("--eval-text", self.eval_text),)
                           if self.eval_text != "none" else ())
        if self.recover_method != "auto":
            from llmpareto.search.recover_methods import REGISTRY

            if self.recover_method not in REGISTRY:
                raise UserError(f"--recover-method {self.recover_method!r}; choose auto or one "
                                f"of {', '.join(REGISTRY)}")

    def _check_quantizer(self) -> None:
        from pathlib import Path

        from llmpareto.compress.quantizers import QUANTIZERS, check_quantizer

        if self.quantizer not in QUANTIZERS:
            raise UserError(f"--quantizer {self.quantizer!r}; choose one of "
                            f"{', '.join(QUANTIZERS)}")
        spaces = [n.strip() for n in str(self.space).split(",")]
        if "formats" in spaces and self.formats is None and self.quantizer == "gptq":
            from llmpareto.spaces.formats import DEFAULT_FORMATS

            # the default formats GPTQ can round onto (none of the K- and i-quants)
            q = QUANTIZERS["gptq"]()
            self.formats = [f for f in DEFAULT_FORMATS if q.targets(f)]
        check_quantizer(self.quantizer, self.formats if "formats" in spaces else None)
        if self.imatrix not in ("on", "off") and not Path(self.imatrix).is_file():
            raise UserError(f"--imatrix {self.imatrix!r}: no such file; give on, off, or a "
                            "llama.cpp imatrix file (.dat or .gguf from llama-imatrix)")
        uses = self.quantizer == "imatrix" and self.imatrix != "off"
        if self.quantizer == "imatrix" and self.imatrix == "off":
            raise UserError("--quantizer imatrix --imatrix off: the imatrix quantizer needs an "
                            "importance matrix; use --imatrix on (or FILE), or --quantizer rtn")
        if self.imatrix == "on" and uses and self.calib_tokens == 0:
            raise UserError("--imatrix on computes the importance matrix on calibration text: "
                            "set --calib-tokens > 0, or pass --imatrix FILE")
        from llmpareto.spaces.presets import PRESETS

        if isinstance(self.presets, str):
            self.presets = [] if self.presets.strip().lower() in ("none", "") else \
                [p.strip() for p in self.presets.split(",") if p.strip()]
        unknown = [p for p in self.presets or [] if p not in PRESETS]
        if unknown:
            raise UserError(f"--presets {','.join(unknown)}: unknown llama.cpp preset; choose "
                            f"from {','.join(PRESETS)}, or none")
        if not 0 <= float(self.gptq_damp) < 1:
            raise UserError(f"--gptq-damp {self.gptq_damp!r} must be in [0, 1), e.g. 0.01")
        from llmpareto import ggml
        from llmpareto.formats import get_format

        needy = [f for f in self.formats or [] if get_format(f).gguf_type is not None
                 and get_format(f).takes_imatrix and ggml.requires_imatrix(get_format(f).gguf_type)]
        if needy and not uses:
            raise UserError(f"{', '.join(needy)} cannot be made without an importance matrix "
                            f"(llama.cpp refuses to); use --quantizer imatrix with --imatrix on "
                            f"or FILE, or drop {', '.join(needy)} from --formats")

    def _check_strategy(self) -> None:
        from llmpareto.search.strategies import NEEDS_PROFILE, STRATEGIES, can_sweep, has_budget

        if self.sampler is not None:  # the old flag: the same names, now --strategy
            if self.strategy not in (None, self.sampler):
                raise UserError(f"--sampler {self.sampler} and --strategy {self.strategy} "
                                "disagree; --sampler is the old name of --strategy: give one")
            self.strategy, self.sampler = self.sampler, None
        self.strategy = self.strategy or DEFAULT_STRATEGY
        if self.strategy not in STRATEGIES:
            raise UserError(f"--strategy {self.strategy!r}; choose one of "
                            f"{', '.join(STRATEGIES)}")
        if self.sweep is not None and int(self.sweep) < 0:
            raise UserError("--sweep must be 0 or more (budgets the knapsack seeds)")
        if int(self.sensitivity_tokens) < 2:
            raise UserError("--sensitivity-tokens must be at least 2")
        if self.strategy in NEEDS_PROFILE and not (has_budget(self) or can_sweep(self)):
            raise UserError(f"--strategy {self.strategy} fills budgets, and this search has none:"
                            " add a cost objective to sweep (--objectives perplexity,memory_bytes"
                            ", or latency_ms, energy_mj), or set --max-memory, --max-latency-ms or"
                            " --max-energy-mj" + (", or leave out --sweep 0" if self.sweep == 0
                                                  else ""))
        if self.strategy in NEEDS_PROFILE and self.calib_tokens == 0:
            raise UserError(f"--strategy {self.strategy} ranks choices by their KL on "
                            "calibration text: set --calib-tokens > 0, or use --strategy nsga2")
