"""Generate docs/api.md, the API reference, from the code.

    python tools/gen_api.py            # rewrite docs/api.md
    python tools/gen_api.py --check    # exit 1 if docs/api.md is out of date (tests/test_docs.py)

Every name in the ``__all__`` of the public modules gets its signature and the first paragraph of
its docstring; classes also get their public methods and properties. The page is generated rather
than written so that it cannot fall behind: a name added to an ``__all__`` appears here, and a test
fails until the page is regenerated.

Signatures are read with :mod:`inspect`; with ``from __future__ import annotations`` their
annotations are the source text, as written. Type aliases and constants have no runtime docstring,
so their values and the string literal under them are read from the defining module's source.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import re
import sys
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "api.md"
MODULES = ("fasm", "fasm.errors", "fasm.runtime", "fasm.persistence", "fasm.testing", "fasm.web",
           "fasm.otel")
WIDTH = 100

HEADER = """\
# API reference

The whole public API: every name in the `__all__` of `fasm`, `fasm.errors`, `fasm.runtime`,
`fasm.persistence`, `fasm.testing`, `fasm.web` and `fasm.otel` (the `otel` extra), with its
signature and the first paragraph of its docstring (`help()` shows the rest: arguments, what it
raises). A name exported by two modules (the errors `fasm` re-exports) is described once, under
the module that defines it.

This page is generated from the code by `python tools/gen_api.py`; `tests/test_docs.py` fails when
it is out of date, so do not edit it by hand.
"""

_ROLE = re.compile(r":[a-z]+:`(~?)([^`<]*?)(?:\s*<([^>]+)>)?`")


def rst_to_md(text: str) -> str:
    """Docstring markup to Markdown: ``code`` -> `code`, :class:`~a.B` -> `B`."""

    def role(m: re.Match[str]) -> str:
        tilde, label, target = m.groups()
        if target:  # :mod:`runtime event <fasm.runtime>`
            return label.strip()
        return f"`{label.rsplit('.', 1)[-1] if tilde else label}`"

    return _ROLE.sub(role, text).replace("``", "`")


def first_paragraph(doc: str | None) -> str:
    if not doc:
        return ""
    paragraph = inspect.cleandoc(doc).split("\n\n", 1)[0].strip()
    # A paragraph that ends in "::" introduces an example that is not shown here.
    if paragraph.endswith("::"):
        paragraph = paragraph[:-1]
    return rst_to_md(paragraph)


def one_line(text: str) -> str:
    return " ".join(text.split())


# -- where things are defined ---------------------------------------------------------------------


def _tree(module: types.ModuleType) -> ast.Module:
    return ast.parse(Path(inspect.getfile(module)).read_text())


def defining_module(public: types.ModuleType, name: str) -> types.ModuleType:
    """The module whose source defines ``public.name`` (following ``from .x import name``)."""
    for node in _tree(public).body:
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name and alias.name == name:
                    base = public.__name__ if public.__file__ and public.__file__.endswith(
                        "__init__.py") else public.__name__.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    target = f"{base}.{node.module}" if node.level else node.module or ""
                    return defining_module(importlib.import_module(target), name)
    return public


def source_attribute(module: types.ModuleType, name: str) -> tuple[str | None, str | None]:
    """The source of ``name = value`` (or ``name: T = value``) in ``module``, and the string
    literal right after it (an attribute docstring), if any."""
    tree = _tree(module)
    source = Path(inspect.getfile(module)).read_text()
    body = tree.body
    for i, node in enumerate(body):
        target: ast.expr | None = None
        value: ast.expr | None = None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign):
            target, value = node.target, node.value
        if isinstance(target, ast.Name) and target.id == name and value is not None:
            doc = None
            if i + 1 < len(body):
                nxt = body[i + 1]
                if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) \
                        and isinstance(nxt.value.value, str):
                    doc = nxt.value.value
            return ast.get_source_segment(source, value), doc
    return None, None


# -- rendering ------------------------------------------------------------------------------------


def _clean(text: str) -> str:
    text = re.sub(r" at 0x[0-9a-f]+", "", text)
    return re.sub(r"\s+", " ", text)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    text = _clean(str(tp)).replace("~", "")
    return re.sub(r"\b(?:[a-z_]\w*\.)+(?=[A-Za-z_])", "", text)  # typing.Generic -> Generic


def wrap_call(head: str, params: list[str], tail: str) -> str:
    """``head(p1, p2) tail`` on one line, or one parameter a line when it is too long."""
    one = f"{head}({', '.join(params)}){tail}"
    if len(one) <= WIDTH:
        return one
    inner = "".join(f"    {p},\n" for p in params)
    return f"{head}(\n{inner}){tail}"


def _annotation(annotation: Any) -> str:
    # With postponed annotations they are the source text; otherwise a type object.
    return annotation if isinstance(annotation, str) else _type_name(annotation)


def _param(p: inspect.Parameter) -> str:
    text = p.name
    if p.kind is p.VAR_POSITIONAL:
        text = "*" + text
    elif p.kind is p.VAR_KEYWORD:
        text = "**" + text
    if p.annotation is not p.empty:
        text += f": {_annotation(p.annotation)}"
    if p.default is not p.empty:
        default = _clean(repr(p.default))
        text += f" = {default}" if p.annotation is not p.empty else f"={default}"
    return text


def signature_parts(obj: Callable[..., Any], *, skip_self: bool = False) -> tuple[list[str], str]:
    """The parameters as source-like text (with ``/`` and ``*`` markers), and `` -> return``."""
    sig = inspect.signature(obj)
    params: list[str] = []
    plist = list(sig.parameters.values())
    if skip_self and plist and plist[0].name in ("self", "cls"):
        plist = plist[1:]
    star = any(p.kind is p.VAR_POSITIONAL for p in plist)
    for i, p in enumerate(plist):
        if p.kind is p.KEYWORD_ONLY and not star:
            params.append("*")
            star = True
        params.append(_param(p))
        if p.kind is p.POSITIONAL_ONLY and (i + 1 == len(plist)
                                            or plist[i + 1].kind is not p.POSITIONAL_ONLY):
            params.append("/")
    tail = "" if sig.return_annotation is inspect.Signature.empty \
        else f" -> {_annotation(sig.return_annotation)}"
    return params, tail


def _bases(cls: type) -> str:
    bases = getattr(cls, "__orig_bases__", None) or cls.__bases__
    shown = [_type_name(b) for b in bases if b is not object]
    return f"({', '.join(shown)})" if shown else ""


def _is_protocol(cls: type) -> bool:
    return bool(getattr(cls, "_is_protocol", False))


def _own_init(cls: type) -> bool:
    """Whether the class (or a non-builtin base) defines how it is constructed."""
    for klass in cls.__mro__:
        if klass in (object, Exception, BaseException, typing.Generic) or _is_protocol(klass):
            return False
        if "__init__" in klass.__dict__ or ("__new__" in klass.__dict__ and klass is not cls):
            return True
    return False


def class_block(name: str, cls: type) -> list[str]:
    header = f"class {name}{_bases(cls)}"
    lines = ["```text", header]
    if not _is_protocol(cls) and _own_init(cls):
        try:
            params, _ = signature_parts(cls)
        except (TypeError, ValueError):
            params = None
        if params is not None:
            lines.append(wrap_call(name, params, ""))
    lines.append("```")
    return lines


def members(cls: type) -> Iterator[tuple[str, Any]]:
    """Public methods and properties defined by the class itself, in source order."""
    for attr, value in cls.__dict__.items():
        if attr.startswith("_"):
            continue
        if isinstance(value, property | staticmethod | classmethod) or inspect.isfunction(value):
            yield attr, value


def member_line(attr: str, value: Any) -> str:
    if isinstance(value, property):
        doc = one_line(first_paragraph(value.__doc__))
        kind = "property"
        return f"- `{attr}` ({kind}): {doc}" if doc else f"- `{attr}` ({kind})"
    fn = value.__func__ if isinstance(value, staticmethod | classmethod) else value
    params, tail = signature_parts(fn, skip_self=not isinstance(value, staticmethod))
    prefix = "async " if inspect.iscoroutinefunction(fn) else ""
    prefix += "classmethod " if isinstance(value, classmethod) else ""
    signature = f"{prefix}{attr}({', '.join(params)}){tail}"
    doc = one_line(first_paragraph(fn.__doc__))
    return f"- `{signature}`" + (f": {doc}" if doc else "")


def entry(module: types.ModuleType, name: str) -> list[str]:
    obj = getattr(module, name)
    out = [f"### `{name}`", ""]
    if inspect.isclass(obj):
        out += class_block(name, obj)
        doc = first_paragraph(obj.__doc__)
        if doc:
            out += ["", doc]
        listed = [member_line(a, v) for a, v in members(obj)]
        if listed:
            out += ["", *listed]
    elif inspect.isfunction(obj):
        params, tail = signature_parts(obj)
        prefix = "async def " if inspect.iscoroutinefunction(obj) else "def "
        out += ["```text", wrap_call(prefix + name, params, tail), "```"]
        doc = first_paragraph(obj.__doc__)
        if doc:
            out += ["", doc]
    else:  # a type alias or a constant: its source text and attribute docstring
        value, attribute_doc = source_attribute(defining_module(module, name), name)
        shown = _clean(value) if value is not None else _clean(repr(obj))
        out += ["```text", f"{name} = {shown}", "```"]
        if attribute_doc:
            out += ["", first_paragraph(attribute_doc)]
    return [*out, ""]


def render() -> str:
    lines = [HEADER]
    described: dict[int, str] = {}
    for modname in MODULES:
        module = importlib.import_module(modname)
        lines += [f"## `{modname}`", "", first_paragraph(module.__doc__), ""]
        for name in module.__all__:
            obj = getattr(module, name)
            home = getattr(obj, "__module__", modname) if inspect.isclass(obj) else modname
            if home in MODULES and home != modname:
                described.setdefault(id(obj), home)  # described under the module defining it
            if id(obj) in described and described[id(obj)] != modname:
                where = described[id(obj)]
                lines += [f"- `{name}`: see [`{where}.{name}`](#{name.lower()}).", ""]
                continue
            described[id(obj)] = modname
            lines += entry(module, name)
    return "\n".join(lines).rstrip("\n") + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when docs/api.md differs from what would be generated")
    args = parser.parse_args()
    text = render()
    if args.check:
        if OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is out of date: run python tools/gen_api.py",
                  file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
