"""Stage — emit: :class:`Spec` (AST) → canonical `.vit` text (``spvit-dsl fmt``).

The law: ``parse(emit(spec))`` equals ``spec`` except for positions. Items keep their order (scope order matters);
layout is canonical: two-space indent, a blank line between top-level items (none between consecutive one-line
block declarations, so a frozen spec reads as a table), and a short block on one line (at most three entries — five for a block declaration — no
comments inside, at most 100 characters).
"""

from __future__ import annotations

from collections.abc import Sequence

from . import ast

INDENT = "  "
MAX_LINE = 100
MAX_INLINE = 3  # entries of a one-line block
MAX_INLINE_SCOPE = 5  # a block declaration (a frozen spec's row: op, ffn, heads, head_dim, sparsity)


def emit(spec: ast.Spec) -> str:
    text = ""
    prev_compact = False
    for item in spec.items:
        part = _item(item)
        compact = isinstance(item, ast.Scope) and "\n" not in part
        text += ("\n" if prev_compact and compact else "\n\n" if text else "") + part
        prev_compact = compact
    tail = "\n".join(f"// {c}".rstrip() for c in spec.end_comments)
    if tail:
        text = f"{text}\n\n{tail}" if text else tail
    return text + "\n" if text else ""


def _comments(node: ast.Commented, indent: str) -> list[str]:
    return [f"{indent}// {c}".rstrip() for c in node.comments]


def _trail(node: ast.Commented) -> str:
    return f"  // {node.trailing}" if node.trailing else ""


def _item(item: ast.Commented) -> str:
    head = _comments(item, "")
    if isinstance(item, ast.Extends):
        return "\n".join(head + [f"extends {_quote(item.path)}{_trail(item)}"])
    if isinstance(item, ast.Embed):
        return "\n".join(head + [f"embed: {_cvalue(item.value)}{_trail(item)}"])
    if isinstance(item, ast.Backbone):
        opener = "backbone" + (f" {item.model}" if item.model else "")
        return "\n".join(head + _block(opener, item, [(s, _setting(s)) for s in item.settings]))
    if isinstance(item, ast.Search):
        opener = "search" + (f" {item.strategy}" if item.strategy else "")
        return "\n".join(head + _block(opener, item, [(s, _setting(s)) for s in item.settings]))
    if isinstance(item, ast.Frozen):
        return "\n".join(head + _block("frozen", item, [(s, _setting(s)) for s in item.settings]))
    if isinstance(item, ast.Budget):
        entries: list[tuple[ast.Commented, str]] = [
            (c, f"{c.metric} <= {c.limit.text}") for c in item.constraints
        ]
        entries += [(s, _setting(s)) for s in item.settings]
        return "\n".join(head + _block("budget", item, entries))
    assert isinstance(item, ast.Scope)
    entries = [(c, f"{c.label}: {_cvalue(c.value)}") for c in item.choices]
    return "\n".join(head + _block(_selector(item.selector), item, entries, MAX_INLINE_SCOPE))


def _block(
    opener: str,
    node: ast.Commented,
    entries: Sequence[tuple[ast.Commented, str]],
    max_inline: int = MAX_INLINE,
) -> list[str]:
    inner_comments = any(e.comments or e.trailing for e, _ in entries)
    inline = f"{opener} {{ {'; '.join(t for _, t in entries)} }}" if entries else f"{opener} {{ }}"
    if not inner_comments and len(entries) <= max_inline and len(inline) <= MAX_LINE:
        return [inline + _trail(node)]
    lines = [f"{opener} {{{_trail(node)}"]
    for entry, text in entries:
        lines += _comments(entry, INDENT)
        lines.append(f"{INDENT}{text}{_trail(entry)}")
    lines.append("}")
    return lines


def _selector(sel: ast.Selector) -> str:
    return {
        "all": lambda: "blocks all",
        "range": lambda: f"blocks {sel.start}..{sel.stop}",
        "block": lambda: f"block {sel.start}",
        "stage": lambda: f"stage {sel.stage}",
        "stage_range": lambda: f"stage {sel.stage} blocks {sel.start}..{sel.stop}",
        "stage_block": lambda: f"stage {sel.stage} block {sel.start}",
    }[sel.form]()


def _setting(s: ast.Setting) -> str:
    return f"{s.key} = {_value(s.value)}"


def _value(v: ast.Value) -> str:
    if isinstance(v, ast.Num):
        return v.text
    if isinstance(v, ast.Str):
        return _quote(v.value)
    if isinstance(v, ast.Name):
        return v.value
    return "(" + ", ".join(_value(x) for x in v.items) + ("," if len(v.items) == 1 else "") + ")"


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _numset(ns: ast.NumSet, *, keyword: bool) -> str:
    if ns.form == "one":
        return ns.items[0].text
    if ns.form == "list":
        body = "{" + ", ".join(n.text for n in ns.items) + "}"
        return body if keyword else f"one of {body}"
    assert ns.start is not None and ns.stop is not None
    return f"{ns.start.text}..{ns.stop.text}" + (f" step {ns.step.text}" if ns.step is not None else "")


def _cvalue(v: ast.ChoiceValue) -> str:
    if isinstance(v, ast.NumSet):
        return _numset(v, keyword=False)
    if isinstance(v, ast.Pair):  # `{2, 4} x 16..64 step 8`: a list needs no `one of` beside the `x`
        return f"{_numset(v.left, keyword=True)} x {_numset(v.right, keyword=True)}"
    if isinstance(v, ast.LayerMap):
        return (
            "{" + ", ".join(f"{e.layer.value}: {_numset(e.values, keyword=False)}" for e in v.entries) + "}"
        )
    if isinstance(v, ast.Words):
        names = [w.value for w in v.words]
        return "one of {" + ", ".join(names) + "}" if v.one_of else names[0]
    if v.form in ("ratios", "widths"):
        assert v.values is not None
        return f"{v.form} {_numset(v.values, keyword=True)}"
    if v.form == "neuron":
        return "per neuron"
    assert v.number is not None
    return f"groups of {v.number.text}" if v.form == "groups" else f"{v.form} {v.number.text}"
