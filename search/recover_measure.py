"""What recovery measures, and on which windows: KL to the base model and perplexity on the
evaluation windows and the evaluation text (`Measure`), the calibration windows recovery learns
on and holds out, and the guard text its keep rule reads (docs/recovery.md)."""

from __future__ import annotations

import numpy as np

from llmpareto.recipe import Recipe

QUALITY = ("perplexity", "kl_nats")  # measured per text and per stage
EVAL_TEXT = "eval_text_"


class Measure:
    """KL to the base model and perplexity on the evaluation windows and the evaluation text,
    one forward pass per text; the base model's log-probabilities computed once."""

    def __init__(self, bench, eval_text: np.ndarray | None,
                 holdout: np.ndarray | None = None, guard: np.ndarray | None = None) -> None:
        from llmpareto.compress import apply
        from llmpareto.evaluators.quality import log_probs64, logits_of

        self.bench = bench
        self.texts = {"": bench.windows.eval}
        if eval_text is not None:
            self.texts[EVAL_TEXT] = eval_text
        apply(bench.model, Recipe(), bench.cache)
        bs = bench.settings.batch_size
        self.base = {k: log_probs64(logits_of(bench.model, w, bs)) for k, w in self.texts.items()}
        self.holdout, self.guard = holdout, guard
        self.holdout_base, self.guard_base = (
            None if w is None else log_probs64(logits_of(bench.model, w, bs))
            for w in (holdout, guard))

    def holdout_kl(self) -> float:
        """KL to the base model on the held-out calibration windows (never the evaluation
        windows or text): what decides whether a point keeps its recovered weights."""
        return self._kl(self.holdout, self.holdout_base)

    def guard_kl(self) -> float | None:
        """KL to the base model on the guard text (`--recover-guard`, a third domain nothing
        learns on; never the evaluation text), None without one: recovered weights that are
        further from the base there are not kept."""
        return None if self.guard is None else self._kl(self.guard, self.guard_base)

    def _kl(self, windows: np.ndarray, base) -> float:
        from llmpareto.evaluators.quality import text_scores

        return float(text_scores(self.bench.model, windows, base,
                                 self.bench.settings.batch_size)["kl_nats"])

    def __call__(self, prefix: str = "") -> dict[str, float]:
        """The model as it is now, scored; columns `prefix + text + metric`."""
        from llmpareto.evaluators.quality import text_scores

        out = {}
        for text, w in self.texts.items():
            got = text_scores(self.bench.model, w, self.base[text], self.bench.settings.batch_size)
            out.update({f"{prefix}{text}{m}": got[m] for m in QUALITY})
        return out


def eval_text_windows(bench) -> np.ndarray | None:
    """The run's `--eval-text` windows, cut as the model runs (None with --eval-text none)."""
    from llmpareto.text import eval_text_windows as cut
    from llmpareto.text import read_eval_text

    s = bench.settings
    if s.eval_text == "none":
        return None
    return cut(bench.tokenizer, read_eval_text(s.eval_text, s.text), s.window,
               s.eval_text_tokens, bench.bos)[0]


def guard_windows(bench) -> np.ndarray | None:
    """The run's `--recover-guard` windows, cut as the model runs, as many tokens as
    --eval-text-tokens (None with --recover-guard none)."""
    from llmpareto.text import DEFAULT_GUARD_TEXT, read_eval_text
    from llmpareto.text import eval_text_windows as cut

    s = bench.settings
    if s.recover_guard == "none":
        return None
    others = (("--eval-text", s.eval_text),) if s.eval_text != "none" else ()
    text = read_eval_text(s.recover_guard, s.text, flag="--recover-guard",
                          default=DEFAULT_GUARD_TEXT, others=others)
    return cut(bench.tokenizer, text, s.window, s.eval_text_tokens, bench.bos,
               flag="--recover-guard")[0]


def recovery_windows(bench) -> tuple[np.ndarray, np.ndarray]:
    """Calibration text (the run's text less its evaluation windows), as the model runs: up to
    --recover-tokens of it to learn on, evenly spread, and a quarter as many other windows
    (at least one) held out, never learned on, to judge the result by (early stopping, and
    whether a point keeps its recovered weights)."""
    from llmpareto.search.distill_run import training_windows

    s = bench.settings
    every = training_windows(bench.tokenizer, s, s.window, bench.bos)
    if len(every) < 2:
        from llmpareto.errors import UserError

        raise UserError(f"recovery needs at least 2 windows of {s.window} tokens of calibration "
                        f"text (the --text less its evaluation windows); it has {len(every)}: "
                        "give a longer --text")
    want = max(1, -(-s.recover_tokens // s.window))
    held = max(1, -(-want // 4))
    n = min(want, len(every) - held)
    learn = np.linspace(0, len(every) - 1, n).round().astype(int)
    rest = np.setdiff1d(np.arange(len(every)), learn)
    keep = rest[np.linspace(0, len(rest) - 1, min(held, len(rest))).round().astype(int)]
    return every[learn], every[keep]


def recovery_measure(bench) -> tuple[np.ndarray, Measure]:
    """What recovering points on `bench` needs, built once per process: the calibration
    windows it learns on, and a Measure with the held-out ones and the guard text."""
    learn, held = recovery_windows(bench)
    return learn, Measure(bench, eval_text_windows(bench), held, guard_windows(bench))
