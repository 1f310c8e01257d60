"""Stage 1 — parse: `.vit` text → :class:`spvit_dsl.lang.ast.Spec`.

The grammar is ``lang/vit.lark`` shipped in the package (LALR, positions propagated). Raw lark errors are turned
into :class:`SpecError` with a friendly message, a caret and a "did you mean" hint; comments are attached to the
statements around them so that formatting keeps them.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedToken, VisitError

from . import ast
from .errors import Span, SpecError, did_you_mean


@lru_cache(maxsize=1)
def grammar() -> Lark:
    return Lark.open_from_package(
        "spvit_dsl.lang", "vit.lark", parser="lalr", propagate_positions=True, maybe_placeholders=False
    )


def parse(text: str, path: str = "<string>") -> ast.Spec:
    """Parse spec text; raise :class:`SpecError` (with the source attached) on malformed input. A leading UTF-8
    byte-order mark is ignored."""
    text = text.removeprefix("\ufeff")
    comments: list[Token] = []
    _check_nesting(text, path)
    try:
        tree = _parse_tree(text, comments)
        spec = _ToAst(path).transform(tree)
    except VisitError as exc:  # an error raised inside a transformer method
        if isinstance(exc.orig_exc, SpecError):
            raise exc.orig_exc.with_source(text) from None
        raise
    except (UnexpectedCharacters, UnexpectedToken, UnexpectedEOF) as exc:
        raise _friendly(exc, text, path).with_source(text) from None
    return _attach_comments(spec, comments, text)


def _parse_tree(text: str, comments: list[Token]) -> Any:
    # The parser is shared (building it is slow) and lexer callbacks are per instance: find comments by a scan.
    comments.extend(_scan_comments(text))
    return grammar().parse(text)


_STRING_OR_COMMENT = re.compile(r'"(?:[^"\\\n]|\\.)*"|//[^\n]*')


def _scan_comments(text: str) -> list[Token]:
    out = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        for m in _STRING_OR_COMMENT.finditer(line):
            if m.group(0).startswith("//"):
                out.append(Token("COMMENT", m.group(0), line=lineno, column=m.start() + 1))
                break
    return out


# ---------------------------------------------------------------- tree → AST
def _span(path: str, meta: Any) -> Span:
    if getattr(meta, "empty", True):
        return Span(path=path)
    return Span(
        path=path, line=meta.line, column=meta.column, end_line=meta.end_line, end_column=meta.end_column
    )


def _tok_span(path: str, tok: Token) -> Span:
    assert tok.line is not None and tok.column is not None  # lexer tokens always carry a position
    return Span(
        path=path,
        line=tok.line,
        column=tok.column,
        end_line=tok.end_line or tok.line,
        end_column=tok.end_column or tok.column + len(tok),
    )


_UNIT = re.compile(r"^([0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)(.*)$")


def number(text: str, span: Span | None = None) -> ast.Num:
    """The AST number of ``text`` as a spec writes it (``3.3G`` → value 3.3, unit ``G``); ValueError if not one."""
    m = _UNIT.match(text)
    if m is None:
        raise ValueError(f"not a number: {text!r}")
    return ast.Num(text=text, value=float(m.group(1)), unit=m.group(2), span=span or Span())


@v_args(meta=True)
class _ToAst(Transformer):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    # -- helpers
    def _s(self, meta: Any) -> Span:
        return _span(self.path, meta)

    def _num(self, tok: Token) -> ast.Num:
        return number(str(tok), _tok_span(self.path, tok))

    def _name(self, tok: Token) -> ast.Name:
        return ast.Name(value=str(tok), span=_tok_span(self.path, tok))

    # -- top level
    def start(self, meta: Any, items: list[Any]) -> ast.Spec:
        return ast.Spec(path=self.path, items=tuple(items), span=self._s(meta))

    def extends(self, meta: Any, c: list[Any]) -> ast.Extends:
        return ast.Extends(path=_unquote(c[0]), span=self._s(meta))

    def backbone(self, meta: Any, c: list[Any]) -> ast.Backbone:
        model = c[0] if c and isinstance(c[0], Token) else None
        settings = tuple(x for x in c if isinstance(x, ast.Setting))
        span = _tok_span(self.path, model) if model is not None else self._s(meta)
        return ast.Backbone(
            model=str(model) if model else None, model_span=span, settings=settings, span=self._s(meta)
        )

    def search(self, meta: Any, c: list[Any]) -> ast.Search:
        name = c[0] if c and isinstance(c[0], Token) else None
        settings = tuple(x for x in c if isinstance(x, ast.Setting))
        span = _tok_span(self.path, name) if name is not None else self._s(meta)
        return ast.Search(
            strategy=str(name) if name else None, strategy_span=span, settings=settings, span=self._s(meta)
        )

    def frozen(self, meta: Any, c: list[Any]) -> ast.Frozen:
        return ast.Frozen(settings=tuple(c), span=self._s(meta))

    def budget(self, meta: Any, c: list[Any]) -> ast.Budget:
        return ast.Budget(
            constraints=tuple(x for x in c if isinstance(x, ast.Constraint)),
            settings=tuple(x for x in c if isinstance(x, ast.Setting)),
            span=self._s(meta),
        )

    def constraint(self, meta: Any, c: list[Any]) -> ast.Constraint:
        metric, _le, limit = c
        return ast.Constraint(
            metric=str(metric),
            metric_span=_tok_span(self.path, metric),
            limit=self._num(limit),
            span=self._s(meta),
        )

    def setting(self, meta: Any, c: list[Any]) -> ast.Setting:
        key, value = c
        return ast.Setting(key=str(key), key_span=_tok_span(self.path, key), value=value, span=self._s(meta))

    def embed(self, meta: Any, c: list[Any]) -> ast.Embed:
        return ast.Embed(value=c[0], span=self._s(meta))

    # -- values
    def num(self, meta: Any, c: list[Any]) -> ast.Num:
        return self._num(c[0])

    def string(self, meta: Any, c: list[Any]) -> ast.Str:
        return ast.Str(value=_unquote(c[0]), span=self._s(meta))

    def name(self, meta: Any, c: list[Any]) -> ast.Name:
        return self._name(c[0])

    def tuple(self, meta: Any, c: list[Any]) -> ast.TupleV:
        return ast.TupleV(items=tuple(c), span=self._s(meta))

    # -- scopes
    def scope(self, meta: Any, c: list[Any]) -> ast.Scope:
        return ast.Scope(selector=c[0], choices=tuple(c[1:]), span=self._s(meta))

    def _sel(self, meta: Any, form: str, **kw: Token) -> ast.Selector:
        vals = {k: self._int(v) for k, v in kw.items()}
        return ast.Selector(form=form, span=self._s(meta), **vals)  # type: ignore[arg-type]

    def _int(self, tok: Token) -> int:
        num = self._num(tok)
        if not num.is_int:
            raise SpecError(f"expected a block or stage index (a whole number), found '{tok}'", num.span)
        return int(num.value)

    def sel_all(self, meta: Any, c: list[Any]) -> ast.Selector:
        return self._sel(meta, "all")

    def sel_range(self, meta: Any, c: list[Any]) -> ast.Selector:
        return self._sel(meta, "range", start=c[0], stop=c[1])

    def sel_block(self, meta: Any, c: list[Any]) -> ast.Selector:
        return self._sel(meta, "block", start=c[0])

    def sel_stage(self, meta: Any, c: list[Any]) -> ast.Selector:
        return self._sel(meta, "stage", stage=c[0])

    def sel_stage_range(self, meta: Any, c: list[Any]) -> ast.Selector:
        return self._sel(meta, "stage_range", stage=c[0], start=c[1], stop=c[2])

    def sel_stage_block(self, meta: Any, c: list[Any]) -> ast.Selector:
        return self._sel(meta, "stage_block", stage=c[0], start=c[1])

    def choice(self, meta: Any, c: list[Any]) -> ast.Choice:
        field, value = c
        return ast.Choice(
            field=str(field), field_span=_tok_span(self.path, field), value=value, span=self._s(meta)
        )

    def joint_choice(self, meta: Any, c: list[Any]) -> ast.Choice:
        field, joint, left, right = (x for x in c if not (isinstance(x, Token) and x.type == "TIMES"))
        return ast.Choice(
            field=str(field),
            field_span=_tok_span(self.path, field),
            joint=self._name(joint),
            value=ast.Pair(left=left, right=right, span=_join(left.span, right.span)),
            span=self._s(meta),
        )

    # -- choice values
    def c_word(self, meta: Any, c: list[Any]) -> ast.Words:
        return ast.Words(words=(self._name(c[0]),), span=self._s(meta))

    def c_words(self, meta: Any, c: list[Any]) -> ast.Words:
        return ast.Words(words=tuple(self._name(t) for t in c), one_of=True, span=self._s(meta))

    def _ffn(self, meta: Any, form: str, **kw: Any) -> ast.FfnSpec:
        return ast.FfnSpec(form=form, span=self._s(meta), **kw)  # type: ignore[arg-type]

    def c_ratios(self, meta: Any, c: list[Any]) -> ast.FfnSpec:
        return self._ffn(meta, "ratios", values=c[1])

    def c_widths(self, meta: Any, c: list[Any]) -> ast.FfnSpec:
        return self._ffn(meta, "widths", values=c[1])

    def c_ratio(self, meta: Any, c: list[Any]) -> ast.FfnSpec:
        return self._ffn(meta, "ratio", number=self._num(c[1]))

    def c_width(self, meta: Any, c: list[Any]) -> ast.FfnSpec:
        return self._ffn(meta, "width", number=self._num(c[1]))

    def c_neuron(self, meta: Any, c: list[Any]) -> ast.FfnSpec:
        return self._ffn(meta, "neuron")

    def c_groups(self, meta: Any, c: list[Any]) -> ast.FfnSpec:
        return self._ffn(meta, "groups", number=self._num(c[0]))

    def c_layers(self, meta: Any, c: list[Any]) -> ast.LayerMap:
        return ast.LayerMap(entries=tuple(c), span=self._s(meta))

    def layer(self, meta: Any, c: list[Any]) -> ast.LayerValues:
        return ast.LayerValues(layer=self._name(c[0]), values=c[1], span=self._s(meta))

    def set_one(self, meta: Any, c: list[Any]) -> ast.NumSet:
        return ast.NumSet(form="one", items=(self._num(c[0]),), span=self._s(meta))

    def set_list(self, meta: Any, c: list[Any]) -> ast.NumSet:
        return ast.NumSet(form="list", items=tuple(self._num(t) for t in c), span=self._s(meta))

    def set_range(self, meta: Any, c: list[Any]) -> ast.NumSet:
        nums = [self._num(t) for t in c if t.type == "NUM"]
        step = nums[2] if len(nums) == 3 else None
        return ast.NumSet(form="range", start=nums[0], stop=nums[1], step=step, span=self._s(meta))


def _join(first: Span, last: Span) -> Span:
    """The span from the start of ``first`` to the end of ``last``."""
    return Span(
        path=first.path,
        line=first.line,
        column=first.column,
        end_line=last.end_line,
        end_column=last.end_column,
    )


def _unquote(tok: Token) -> str:
    body = str(tok)[1:-1]
    return re.sub(r"\\(.)", r"\1", body)


# ---------------------------------------------------------------- comments
_COMMENTED = (
    ast.Extends,
    ast.Backbone,
    ast.Embed,
    ast.Scope,
    ast.Budget,
    ast.Search,
    ast.Frozen,
    ast.Setting,
    ast.Choice,
    ast.Constraint,
)


def _preorder(node: Any, out: list[Any]) -> list[Any]:
    if isinstance(node, _COMMENTED):
        out.append(node)
    if isinstance(node, ast.Node):
        for k in type(node).model_fields:
            v = getattr(node, k)
            for child in v if isinstance(v, tuple) else (v,):
                if isinstance(child, ast.Node):
                    _preorder(child, out)
    return out


def _attach_comments(spec: ast.Spec, comments: list[Token], text: str) -> ast.Spec:
    if not comments:
        return spec
    lines = text.split("\n")
    nodes = _preorder(spec, [])
    leading: dict[int, list[str]] = {}
    trailing: dict[int, str] = {}
    end: list[str] = []
    for tok in comments:
        body = str(tok)[2:].strip()
        line = tok.line
        assert line is not None and tok.column is not None  # _scan_comments gives each a position
        inline = bool(lines[line - 1][: tok.column - 1].strip())
        if inline:
            owner = _inline_owner(nodes, line)
            if owner is not None and id(owner) not in trailing:
                trailing[id(owner)] = body
                continue
        after = [n for n in nodes if n.span.line > line]
        if after:
            first = min(after, key=lambda n: n.span.line)  # min keeps the first (outermost) of equal lines
            leading.setdefault(id(first), []).append(body)
        else:
            end.append(body)
    spec = _rebuild(spec, leading, trailing)
    return spec.model_copy(update={"end_comments": tuple(end)})


def _inline_owner(nodes: list[Any], line: int) -> Any:
    """The statement an end-of-line comment belongs to: the outermost one ending on that line, else the
    innermost one starting there (a block's header line), else the innermost one around it."""
    ending = [n for n in nodes if n.span.end_line == line]
    if ending:
        return ending[0]
    starting = [n for n in nodes if n.span.line == line]
    if starting:
        return starting[-1]
    containing = [n for n in nodes if n.span.line <= line <= n.span.end_line]
    return containing[-1] if containing else None


def _rebuild(node: Any, leading: dict[int, list[str]], trailing: dict[int, str]) -> Any:
    if not isinstance(node, ast.Node):
        return node
    update: dict[str, Any] = {}
    for k in type(node).model_fields:
        v = getattr(node, k)
        if isinstance(v, tuple) and v and isinstance(v[0], ast.Node):
            update[k] = tuple(_rebuild(x, leading, trailing) for x in v)
        elif isinstance(v, ast.Node):
            update[k] = _rebuild(v, leading, trailing)
    if id(node) in leading:
        update["comments"] = tuple(leading[id(node)])
    if id(node) in trailing:
        update["trailing"] = trailing[id(node)]
    return node.model_copy(update=update) if update else node


# ---------------------------------------------------------------- friendly parse errors
_TERMINALS = {
    "NAME": "a name",
    "MODEL": "a timm model name",
    "NUM": "a number",
    "STRING": "a quoted string",
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "LPAR": "'('",
    "RPAR": "')'",
    "COLON": "':'",
    "SEMICOLON": "';'",
    "EQUAL": "'='",
    "COMMA": "','",
    "LE": "'<='",
    "__ANON_0": "'..'",
    "$END": "end of file",
}
JOINT_EXAMPLE = "heads x head_dim: {2, 4, 6} x 16..64 step 8"


@lru_cache(maxsize=1)
def _times_terminals() -> frozenset[str]:
    """The terminals of the product sign: ``x`` (TIMES) and ``×``."""
    return frozenset(
        t.name
        for t in grammar().terminals
        if t.name == "TIMES" or getattr(t.pattern, "value", None) == "\u00d7"
    )


_TOP = ["backbone", "block", "blocks", "budget", "embed", "extends", "frozen", "search", "stage"]


def _describe_expected(expected: set[str]) -> list[str]:
    out = []
    for term in sorted(expected):
        try:
            pattern = grammar().get_terminal(term).pattern
            literal = pattern.value if pattern.type == "str" else None
        except KeyError:
            literal = None
        out.append(_TERMINALS.get(term) or (f"'{literal}'" if literal else term.lower()))
    return sorted(set(out))


MAX_NESTING = (
    32  # a spec nests a block and a tuple; a few more levels are harmless, thousands exhaust the stack
)


def _check_nesting(text: str, path: str) -> None:
    """SpecError at the first bracket that opens more than :data:`MAX_NESTING` levels deep (outside comments and
    strings), before the parser recurses that deep."""
    depth, line, col, i, n = 0, 1, 1, 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "/" and text.startswith("//", i):  # a comment: to the end of the line
            j = text.find("\n", i)
            i, col = (n, col) if j < 0 else (j, col + (j - i))
            continue
        if ch == '"':  # a string: to the closing quote (escapes skipped) or the end of the line
            j = i + 1
            while j < n and text[j] not in '"\n':
                j += 2 if text[j] == "\\" else 1
            col += j + 1 - i
            i = j + 1
            continue
        if ch in "({[":
            depth += 1
            if depth > MAX_NESTING:
                raise SpecError(
                    f"brackets nested more than {MAX_NESTING} levels deep",
                    Span(path=path, line=line, column=col, end_line=line, end_column=col + 1),
                    hint="a spec nests a block and a tuple at most",
                ).with_source(text)
        elif ch in ")}]":
            depth = max(0, depth - 1)
        if ch == "\n":
            line, col = line + 1, 1
        else:
            col += 1
        i += 1


def _friendly(exc: Exception, text: str, path: str) -> SpecError:
    if isinstance(exc, UnexpectedEOF):
        lines = text.rstrip().split("\n") or [""]
        line, col = len(lines), len(lines[-1]) + 1  # just after the last character of the file
        exp = _describe_expected(set(exc.expected))
        return SpecError(
            "unexpected end of file; expected " + ", ".join(exp),
            Span(path=path, line=line, column=col, end_line=line, end_column=col + 1),
            hint="a '{' block may be missing its closing '}'" if "'}'" in exp else None,
        )
    if isinstance(exc, UnexpectedCharacters):
        span = Span(path=path, line=exc.line, column=exc.column, end_line=exc.line, end_column=exc.column + 1)
        return SpecError(f"unexpected character {exc.char!r}", span, hint=_char_hint(exc.char))
    assert isinstance(exc, UnexpectedToken)
    tok = exc.token
    glued = _spaced_unit(text, tok.start_pos or 0, path)
    if glued is not None:  # `latency <= 6 ms`: the unit became the name of a statement that never finished
        return glued
    if tok.type == "$END":
        return _friendly(UnexpectedEOF(exc.expected), text, path)
    expected = set(exc.expected)
    times = _times_terminals()
    # after a field name `:` is what was forgotten; the joint form `heads x head_dim:` is not worth listing there
    exp = _describe_expected(expected - times if "COLON" in expected else expected)
    span = _tok_span(path, tok)
    if tok.type == "MODEL":  # where no model name may stand, the lexer's longest match is just a name
        tok = Token(
            "NAME", str(tok), tok.start_pos, tok.line, tok.column, tok.end_line, tok.end_column, tok.end_pos
        )
    what = _TERMINALS.get(tok.type, repr(str(tok)))
    if tok.type in ("NAME", "NUM"):
        what = f"{tok.type.lower()} '{tok}'"
    if tok.type in times:  # `heads: {2, 4} x 16`: a product of sets outside a joint choice
        return SpecError(
            f"unexpected '{tok}': only a joint choice multiplies two number sets",
            span,
            hint=f"name both fields: '{JOINT_EXAMPLE}'",
        )
    if expected and expected <= times:  # the right-hand side of a joint choice is missing or glued together
        return SpecError(
            f"unexpected {what}; a joint choice takes two number sets joined by 'x'",
            span,
            hint=f"e.g. '{JOINT_EXAMPLE}' (with spaces around 'x')",
        )
    words = [e.strip("'") for e in exp if e.startswith("'") and e[1:-1].isalpha()]
    hint = None
    if tok.type == "NAME" and words:
        hint = did_you_mean(str(tok), words) or None
    if expected >= {"EXTENDS", "BACKBONE", "BUDGET"} or set(words) >= {"backbone", "budget", "search"}:
        return SpecError(
            f"unexpected {what}; expected a declaration: " + ", ".join(_TOP),
            span,
            hint=did_you_mean(str(tok), _TOP) or None,
        )
    return SpecError(f"unexpected {what}; expected " + ", ".join(exp), span, hint=hint)


_UNIT_WORDS = re.compile(r"(?:ms|us|s|K|M|G|T|[KMGT]?(?:FLOPs|MACs|params))")
# a number, then spaces (no newline), then a unit word, then only blanks and comments up to the offending token
_SPACED_UNIT = re.compile(r"(?<![\w.])([0-9][0-9.eE+-]*)[ \t]+([A-Za-z]+)(?:[ \t]*(?://[^\n]*)?\s*)$")


def _spaced_unit(text: str, pos: int, path: str) -> SpecError | None:
    """A SpecError at the unit word when the text just before the unexpected token ends in ``<number> <unit>``
    (``latency <= 6 ms``): the parser reads the unit as the next statement's name and only fails a token later,
    often on the next line. None otherwise."""
    m = _SPACED_UNIT.search(text, max(0, pos - 400), pos)  # a window: hostile specs can be huge
    if m is None or not _UNIT_WORDS.fullmatch(m.group(2)):
        return None
    start = m.start(2)
    line = text.count("\n", 0, start) + 1
    col = start - (text.rfind("\n", 0, start) + 1) + 1
    span = Span(path=path, line=line, column=col, end_line=line, end_column=col + len(m.group(2)))
    return SpecError(
        f"'{m.group(1)} {m.group(2)}': a unit follows its number without a space",
        span,
        hint=f"write '{m.group(1)}{m.group(2)}'",
    )


def _char_hint(char: str) -> str | None:
    if char == "#":
        return "comments start with '//'"
    if char == '"':
        return "a string must close on the same line with '\"'"
    if char in "<>=!":
        return "budgets are written 'flops <= 3.3G' or 'params <= 16M'"
    if char in "-−":
        return "numbers in a spec are never negative: settings, widths, indices and budgets are 0 or more"
    return None
