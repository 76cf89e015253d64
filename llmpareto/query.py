"""`--where` filters such as "latency_ms<=20 and memory_bytes<=150e6", parsed, never eval-ed.

Python's own parser builds the syntax tree; only comparisons of column names with numbers
(or quoted strings), joined by and/or/not, are accepted, and they are interpreted here.
"""

from __future__ import annotations

import ast
import operator

import pandas as pd

from llmpareto.errors import UserError

_CMP = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
        ast.Eq: operator.eq, ast.NotEq: operator.ne}
FORMS = "e.g. \"latency_ms<=20 and memory_bytes<=150e6\" or \"perplexity < 20 or trial == 3\""


def _operand(node: ast.AST, df: pd.DataFrame, expr: str):
    if isinstance(node, ast.Name):
        if node.id not in df.columns:
            raise UserError(f"--where {expr!r}: unknown column {node.id!r}; columns: "
                            f"{', '.join(c for c in df.columns if not c.startswith('param:'))}")
        return df[node.id]
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)) \
            and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) \
            and isinstance(node.operand, ast.Constant):
        return -node.operand.value
    raise UserError(f"--where {expr!r}: only column names and numbers may be compared; {FORMS}")


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
        left = _operand(node.left, df, expr)
        out = pd.Series(True, index=df.index)
        for op, right_node in zip(node.ops, node.comparators):
            if type(op) not in _CMP:
                raise UserError(f"--where {expr!r}: operator {type(op).__name__} is not "
                                f"supported; use < <= > >= == !=")
            right = _operand(right_node, df, expr)
            out &= _CMP[type(op)](left, right)
            left = right
        return out.fillna(False).astype(bool)
    raise UserError(f"--where {expr!r} is not a comparison; {FORMS}")


def where(df: pd.DataFrame, expr: str | None) -> pd.DataFrame:
    """Rows of `df` for which `expr` holds (all rows when expr is empty)."""
    if not expr or not expr.strip():
        return df
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        raise UserError(f"--where {expr!r} does not parse; {FORMS}") from None
    return df[_mask(tree.body, df, expr)]
