"""Text for calibration and evaluation: load, tokenize once, cut disjoint windows.

The default text is CPython's own documentation (`pydoc_data.topics`), real prose that
ships with every Python; `--text FILE ...` uses the user's files instead.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmpareto.errors import UserError

DEFAULT_TEXT = "pydoc"
# The evaluation text of another domain (legal prose, not documentation) that a run never
# calibrates or trains on: the history and license of Python, shipped in llmpareto/texts/.
DEFAULT_EVAL_TEXT = "python-license"
# The guard text of a third domain (source code) that recovery's keep rule reads and nothing
# learns on: excerpts of eight CPython 3.11 standard-library modules (argparse, textwrap,
# fractions, statistics, heapq, csv, shlex, difflib; PSF license), shipped beside it.
DEFAULT_GUARD_TEXT = "python-source"
SHIPPED_TEXTS = (DEFAULT_EVAL_TEXT, DEFAULT_GUARD_TEXT)
TEXTS = Path(__file__).parent / "texts"
# Peak memory of tokenizing once, per byte of text: the fast tokenizer keeps ids, offsets and
# token strings per token (measured 148-154 with a BPE on 20 and 50 MB of the CPython docs).
TOKENIZE_BYTES_PER_BYTE = 150


# How windows are built, recorded in run.json: a run whose record differs scored other tokens.
WINDOW_SCHEME = "bos-first"  # BOS (when the model's tokenizer adds one) then text tokens


@dataclass
class TextWindows:
    calib: np.ndarray  # (n_calib, window) int64 token ids, for KL to the base model
    eval: np.ndarray  # (n_eval, window) int64 token ids, for perplexity; disjoint from calib
    n_tokens: int  # tokens in the whole text
    sha256: str  # of the text, recorded in run.json
    bos: int | None = None  # the BOS id at position 0 of every window (never a scored target)

    @property
    def window(self) -> int:
        return self.eval.shape[1]

    def record(self) -> dict:
        """How these windows were built, for run.json."""
        return window_record(self.bos)


def window_record(bos: int | None) -> dict:
    return {"scheme": WINDOW_SCHEME, "bos_token_id": bos}


def bos_token(tokenizer, adds_bos: bool | None = None, needs_bos: bool = False,
              what: str = "the model") -> int | None:
    """The BOS id the model puts before a text, or None when it puts none.

    `adds_bos`: what the model file says (a GGUF's tokenizer.ggml.add_bos_token, which is what
    llama.cpp does); else what the tokenizer itself does when asked for special tokens.
    `needs_bos`: the family always runs with BOS (a tokenizer without one is refused)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if needs_bos and bos is None:
        raise UserError(f"{what}: its family always puts a BOS token first, and its tokenizer "
                        "has none (bos_token is unset); use the tokenizer the model was trained "
                        "with")
    if adds_bos is None:
        with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
        plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
        adds_bos = (bos is not None and len(with_special) > len(plain)
                    and with_special[0] == bos)
    return int(bos) if (adds_bos or needs_bos) and bos is not None else None


def read_text(files: list[str] | None) -> tuple[str, str]:
    """(text, description). Raises UserError for missing or empty files."""
    if not files or list(files) == [DEFAULT_TEXT]:
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics)), "pydoc_data.topics"
    paths = [Path(name).expanduser() for name in files]
    for name, p in zip(files, paths):
        if not p.is_file():
            raise UserError(f"--text {name}: no such file (give a UTF-8 text file, or omit "
                            "--text to use the embedded CPython documentation)")
    _check_memory(files, sum(p.stat().st_size for p in paths))
    parts = []
    for name, p in zip(files, paths):
        try:
            content = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(f"--text {name} is not UTF-8 text: {exc}") from None
        except OSError as exc:
            raise UserError(f"--text {name}: cannot read it ({exc.strerror}); check the file's "
                            "permissions") from None
        if not content.strip():
            raise UserError(f"--text {name} is empty; give a file with some prose in it")
        parts.append(content)
    return "\n\n".join(parts), ", ".join(files)


def eval_text_path(name: str) -> Path:
    """The file `--eval-text name` (or `--recover-guard name`) reads: a shipped text by name,
    else a path."""
    return TEXTS / f"{name}.txt" if name in SHIPPED_TEXTS else Path(name).expanduser()


def read_eval_text(name: str, text: list[str] | None, flag: str = "--eval-text",
                   default: str = DEFAULT_EVAL_TEXT,
                   others: tuple[tuple[str, str], ...] = ()) -> tuple[str, str]:
    """(text, description) of `flag name` (a text of another domain the run never calibrates
    or trains on), refusing a missing, empty or non-UTF-8 file and one with the same contents
    as `--text` (it would not be held out) or as any of `others` ((flag, name) pairs)."""
    p = eval_text_path(name)
    if not p.is_file():
        raise UserError(f"{flag} {name}: no such file; give a UTF-8 text of another domain "
                        f"than --text, or leave it out to use the shipped {default}, "
                        "or none")
    try:
        content = p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as exc:
        raise UserError(f"{flag} {name}: cannot read it as UTF-8 text ({exc})") from None
    if not content.strip():
        raise UserError(f"{flag} {name} is empty; give a file with some prose in it")
    main, desc = read_text(text)
    same = content.strip() == main.strip() or any(
        content.strip() == Path(f).expanduser().read_text(encoding="utf-8").strip()
        for f in (text or []) if f != DEFAULT_TEXT)
    if same:
        raise UserError(f"{flag} {name} is the same text as --text ({desc}): it must be "
                        "a text the run never calibrates or trains on; give another file")
    for other_flag, other in others:
        q = eval_text_path(other)
        if q.is_file() and content.strip() == q.read_text(encoding="utf-8").strip():
            raise UserError(f"{flag} {name} is the same text as {other_flag} {other}: give "
                            "a text of a third domain, or none")
    return content, (name + " (shipped)") if name in SHIPPED_TEXTS else name


def eval_text_windows(tokenizer, text: tuple[str, str], window: int, tokens: int,
                      bos: int | None = None, flag: str = "--eval-text",
                      ) -> tuple[np.ndarray, str]:
    """Windows of the evaluation text as the model runs (BOS first when it adds one), as many
    as `tokens` asks and the text holds (at least one); and the text's sha256."""
    content, desc = text
    ids = np.asarray(tokenizer(content, add_special_tokens=False)["input_ids"], dtype=np.int64)
    span = window - (bos is not None)
    n = min(len(ids) // span, -(-tokens // window))
    if n < 1:
        raise UserError(f"{flag} {desc} has {len(ids)} tokens, fewer than one window of "
                        f"{span}; give a longer text or a smaller --window")
    wins = ids[np.linspace(0, len(ids) // span - 1, n).round().astype(int)[:, None] * span
               + np.arange(span)[None, :]]
    return with_bos(wins, bos), hashlib.sha256(content.encode()).hexdigest()


def _check_memory(files: list[str], size: int) -> None:
    """Refuse, with the numbers, a text whose tokenization would not fit in free memory."""
    from llmpareto import models
    from llmpareto.units import format_bytes

    need, free = size * TOKENIZE_BYTES_PER_BYTE, models.available_memory_bytes()
    if free is None or need <= free:
        return
    raise UserError(
        f"--text {', '.join(files)}: {format_bytes(size)} ({size} bytes) of text; tokenizing it "
        f"needs about {format_bytes(need)} ({need} bytes, {TOKENIZE_BYTES_PER_BYTE} per byte) "
        f"and only {format_bytes(free)} ({free} bytes) is available (MemAvailable in "
        f"/proc/meminfo); give a shorter text (a search reads only --eval-tokens + "
        "--calib-tokens tokens of it), or free memory")


def make_windows(
    ids: np.ndarray, window: int, calib_tokens: int, eval_tokens: int, source: str = "text"
) -> tuple[np.ndarray, np.ndarray]:
    """Split a token stream into non-overlapping windows; eval and calib never share a token.

    Eval windows are spread evenly over the whole text (so the score is not about one
    chapter), calib windows evenly over the windows left.
    """
    if window < 2:
        raise UserError(f"--window {window} must be at least 2 tokens")
    n_eval = -(-eval_tokens // window)
    n_calib = -(-calib_tokens // window) if calib_tokens > 0 else 0
    n_windows = len(ids) // window
    if n_eval + n_calib > n_windows:
        need = (n_eval + n_calib) * window
        raise UserError(
            f"{source} has {len(ids)} tokens but --eval-tokens {eval_tokens} + --calib-tokens "
            f"{calib_tokens} in windows of {window} need {need}; give a longer --text or ask "
            "for fewer tokens"
        )
    all_w = ids[: n_windows * window].reshape(n_windows, window)
    eval_idx = np.linspace(0, n_windows - 1, n_eval).round().astype(int)
    rest = np.setdiff1d(np.arange(n_windows), eval_idx)
    calib_idx = rest[np.linspace(0, len(rest) - 1, n_calib).round().astype(int)] if n_calib else []
    return all_w[np.asarray(calib_idx, dtype=int)], all_w[eval_idx]


def with_bos(windows: np.ndarray, bos: int | None) -> np.ndarray:
    """`windows` with a column of `bos` in front (unchanged when bos is None)."""
    if bos is None:
        return windows
    return np.concatenate([np.full((len(windows), 1), bos, dtype=np.int64), windows], axis=1)


def tokenize_windows(
    tokenizer, text: tuple[str, str], window: int, calib_tokens: int, eval_tokens: int,
    bos: int | None = None,
) -> TextWindows:
    """Tokenize `text` (as read_text returns it) once and cut its windows, as the model runs:
    with `bos`, each window is BOS then `window - 1` text tokens (the same windows and scored
    tokens per window as without; BOS is context, never a target)."""
    text, desc = text
    if bos is not None and window < 3:
        raise UserError(f"--window {window}: with the BOS token first a window needs at least 3")
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    span = window - (bos is not None)
    if bos is not None:  # as many windows as without BOS: ceil(tokens / window) of each
        calib_tokens = -(-calib_tokens // window) * span
        eval_tokens = -(-eval_tokens // window) * span
    calib, evalw = make_windows(ids, span, calib_tokens, eval_tokens, source=f"--text {desc}")
    return TextWindows(with_bos(calib, bos), with_bos(evalw, bos), len(ids),
                       hashlib.sha256(text.encode()).hexdigest(), bos)
