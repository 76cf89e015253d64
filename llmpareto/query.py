"""`--where` filters such as "latency_ms<=20 and memory_bytes<=150e6", parsed, never eval-ed.

Python's own parser builds the syntax tree (nothing is compiled or run); only comparisons of
column names with numbers (or quoted strings), joined by and/or/not, are accepted, and they are
interpreted here on the frame's columns.
"""

from __future__ import annotations

import ast
import operator

import pandas as pd

from llmpareto.errors import UserError

_CMP = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
        ast.Eq: operator.eq, ast.NotEq: operator.ne}
FORMS = ("allowed: COLUMN OP NUMBER (or 'text'), OP one of < <= > >= == !=, joined with and, "
         "or, not and parentheses, e.g. \"latency_ms<=20 and memory_bytes<=150e6\" or "
         "\"perplexity < 20 or not trial == 3\"")
MAX_CHARS = 2000  # a filter is a line; longer input is refused before it is parsed


def _operand(node: ast.AST, df: pd.DataFrame, expr: str):
    if isinstance(node, ast.Name):
        if node.id not in df.columns:
            raise UserError(f"--where {expr!r}: unknown column {node.id!r}; columns: "
                            f"{', '.join(c for c in df.columns if not c.startswith('param:'))}")
        return df[node.id]
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)) \
            and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)) \
            and isinstance(node.operand, ast.Constant) \
            and type(node.operand.value) in (int, float):
        value = node.operand.value
        return -value if isinstance(node.op, ast.USub) else value
    raise UserError(f"--where {expr!r}: only column names and numbers may be compared; {FORMS}")


def _compare(node: ast.Compare, df: pd.DataFrame, expr: str) -> pd.Series:
    left = _operand(node.left, df, expr)
    out = pd.Series(True, index=df.index)
    for op, right_node in zip(node.ops, node.comparators):
        if type(op) not in _CMP:
            raise UserError(f"--where {expr!r}: operator {type(op).__name__} is not "
                            f"supported; {FORMS}")
        right = _operand(right_node, df, expr)
        try:
            out &= _CMP[type(op)](left, right)
        except (TypeError, ValueError, OverflowError):
            raise UserError(f"--where {expr!r}: {ast.unparse(node)} compares text with a "
                            f"number; {FORMS}") from None
        left = right
    return out.fillna(False).astype(bool)


def _mask(node: ast.AST, df: pd.DataFrame, expr: str) -> pd.Series:
    if isinstance(node, ast.BoolOp):
        parts = [_mask(v, df, expr) for v in node.values]
        out = parts[0]
        for p in parts[1:]:
            out = (out & p) if isinstance(node.op, ast.And) else (out | p)
        return out
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return ~_mask(node.operand, df, expr)
    if isinstance(node, ast.Compare):
        return _compare(node, df, expr)
    raise UserError(f"--where {expr!r} is not a comparison; {FORMS}")


def where(df: pd.DataFrame, expr: str | None) -> pd.DataFrame:
    """Rows of `df` for which `expr` holds (all rows when expr is empty)."""
    if not expr or not expr.strip():
        return df
    if len(expr) > MAX_CHARS:
        raise UserError(f"--where {expr[:60]!r}... is {len(expr)} characters, more than "
                        f"{MAX_CHARS}; {FORMS}")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
        return df[_mask(tree.body, df, expr)]
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        # the parser's own limits (nesting, NUL bytes) are a bad expression like any other
        raise UserError(f"--where {expr!r} does not parse; {FORMS}") from None
