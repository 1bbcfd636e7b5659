"""What gradmagic reads from the code of a watched block, without running it."""

from __future__ import annotations

import ast
import functools
import re
from typing import NamedTuple

GRAD_OFF = re.compile(r"\b(no_grad|inference_mode)\(|set_grad_enabled\(False")


class ParsedSource(NamedTuple):
    tree: ast.Module
    names: frozenset[str]  # every name the code mentions (`ast.Name`)
    defines: bool  # whether it defines a function, lambda or class


@functools.lru_cache(maxsize=64)
def parse_source(source: str) -> ParsedSource | None:
    """The code's syntax tree and names; None when it does not parse. Kept for the last
    cells seen: a re-run cell is not parsed again."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    defines = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
    names, found = set(), False
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, defines):
            found = True
    return ParsedSource(tree, frozenset(names), found)


def names_in(source: str | None) -> frozenset[str]:
    """Top-level names the code mentions (`x`, `model`)."""
    if not source:
        return frozenset()
    parsed = parse_source(source)
    if parsed is None:
        return frozenset(re.findall(r"[A-Za-z_]\w*", source))
    return parsed.names


def _tree(source: str | None) -> ast.Module:
    parsed = parse_source(source or "")
    return parsed.tree if parsed is not None else ast.Module(body=[], type_ignores=[])


class Cut(NamedTuple):
    """Where the code cuts tensors off the graph."""

    code: str  # what it wrote: `model(x).detach()`, `w.data`, `with torch.no_grad():`
    tensor: str  # the expression cut: `model(x)`, `w` ("" for a block)
    line: int  # in the block's code, from 1
    end: int = 0  # the last line of a `with` block
    kind: str = ""  # "detach", "data", "requires_grad_", "no_grad", "integer cast"
    names: frozenset[str] = frozenset()  # the names the cut expression (or block) reads


INTEGER_CASTS = ("long", "int", "short", "byte", "char", "bool")
INTEGER_DTYPES = re.compile(r"\b(u?int\d*|long|short|bool)\b")


def _names(node: ast.AST) -> frozenset[str]:
    return frozenset(n.id for n in ast.walk(node) if isinstance(n, ast.Name))


def cuts(source: str | None) -> list[Cut]:
    """`.detach()`, `.data`, `.requires_grad_(False)` and `no_grad`/`inference_mode`
    blocks that compute something (an update `w -= lr * w.grad` under `no_grad` is
    no cut), in the order they appear."""
    found = []
    for node in ast.walk(_tree(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            attr, value = node.func.attr, node.func.value
            off = attr == "requires_grad_" and any(
                isinstance(a, ast.Constant) and a.value is False for a in node.args
            )
            kind = "detach" if attr in ("detach", "detach_") else "requires_grad_" if off else ""
            if not kind and (attr in INTEGER_CASTS and not node.args and not node.keywords):
                kind = "integer cast"
            to_integer = attr in ("to", "type") and node.args
            if not kind and to_integer and INTEGER_DTYPES.search(ast.unparse(node.args[0])):
                kind = "integer cast"
            if kind:
                found.append(
                    Cut(
                        ast.unparse(node),
                        ast.unparse(value),
                        node.lineno,
                        kind=kind,
                        names=_names(value),
                    )
                )
        elif isinstance(node, ast.Attribute) and node.attr == "data":
            found.append(
                Cut(
                    ast.unparse(node),
                    ast.unparse(node.value),
                    node.lineno,
                    kind="data",
                    names=_names(node.value),
                )
            )
        elif isinstance(node, ast.With):
            block = grad_off_block(node)
            if block:
                end = getattr(node, "end_lineno", None) or node.lineno
                body = frozenset().union(*(_names(b) for b in node.body))
                found.append(Cut(f"with {block}:", "", node.lineno, end, "no_grad", body))
    return sorted(found, key=lambda c: c.line)


def grad_off_block(node: ast.With) -> str | None:
    """`torch.no_grad()` when a `with` block turns gradients off and assigns a variable
    (computes something); None for no such block, or one that only updates in place."""
    off = [ast.unparse(i.context_expr) for i in node.items]
    off = [text for text in off if GRAD_OFF.search(text)]
    assigns = any(isinstance(n, ast.Assign) for b in node.body for n in ast.walk(b))
    return off[0] if off and assigns else None


def grad_off_blocks(source: str | None) -> list[str]:
    """The `with` blocks of the code that compute with gradients off."""
    blocks = []
    for node in ast.walk(_tree(source)):
        if isinstance(node, ast.With):
            block = grad_off_block(node)
            if block:
                blocks.append(block)
    return blocks


def grad_reads(code: str) -> list[str]:
    """The expressions whose `.grad` a line of code reads: `y.grad` -> `y`."""
    code = code.strip()
    if not code:
        return []
    try:
        tree = ast.parse(code)
    except SyntaxError:
        # A lone line such as `if y.grad is None:` does not parse by itself.
        return re.findall(r"([A-Za-z_][\w.]*)\.grad\b", code)
    return [
        ast.unparse(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr == "grad"
        and isinstance(node.ctx, ast.Load)
    ]


def dotted_names(source: str | None) -> list[str]:
    """The names and dotted attribute chains the code reads (`torch.func.grad`, `vmap`),
    longest chain only, in the order they appear."""
    found: dict[str, None] = {}
    inner: set[int] = set()
    for node in ast.walk(_tree(source)):
        if id(node) in inner or not isinstance(node, (ast.Name, ast.Attribute)):
            continue
        parts = []
        part: ast.AST = node
        while isinstance(part, ast.Attribute):
            parts.append(part.attr)
            inner.add(id(part.value))
            part = part.value
        if isinstance(part, ast.Name):
            found[".".join([part.id, *reversed(parts)])] = None
    return list(found)
