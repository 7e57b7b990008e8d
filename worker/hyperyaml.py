"""Safe reader for hyperpyyaml-tagged model configs (``cosyvoice3.yaml``).

Upstream builds its whole model by *executing* the yaml: ``!new:pkg.Class`` instantiates,
``!name:pkg.fn`` makes a partial, ``!apply:pkg.fn [args]`` calls at load time (the released file
seeds RNGs that way). This module reads the same file as plain data and never imports, calls or
even resolves a dotted name. Tags become :class:`Node` records; ``!ref`` references are resolved
to the referenced data (``<a> * <b>`` arithmetic is evaluated by a tiny whitelisted evaluator).

Any tag it does not know is an error naming the file and the tag.
"""

from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A model config could not be read or does not describe a supported model."""


@dataclass
class Node:
    """A hyperpyyaml call site kept as data: ``kind`` is new/name/apply, ``target`` the dotted
    name exactly as written (never imported), ``args``/``kwargs`` its arguments."""

    kind: str
    target: str
    args: list = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.kwargs[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.kwargs.get(key, default)


@dataclass
class _Ref:
    expr: str


_KNOWN_PREFIXES = ("new", "name", "apply")
_FLOAT_RE = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)$")


class _Loader(yaml.SafeLoader):
    """SafeLoader plus hyperpyyaml's tags as inert data constructors."""


# PyYAML (YAML 1.1) reads "1e-06" as a string; hyperpyyaml users expect a float.
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


def _construct_call(loader: _Loader, tag_suffix: str, node: yaml.Node) -> Node:
    kind, _, target = tag_suffix.partition(":")
    if isinstance(node, yaml.MappingNode):
        return Node(kind, target, kwargs=loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return Node(kind, target, args=loader.construct_sequence(node, deep=True))
    value = loader.construct_scalar(node)
    return Node(kind, target, args=[] if value in ("", None) else [value])


def _make_prefix_constructor(kind: str):
    def construct(loader: _Loader, suffix: str, node: yaml.Node) -> Node:
        return _construct_call(loader, f"{kind}:{suffix}", node)

    return construct


for _kind in _KNOWN_PREFIXES:
    _Loader.add_multi_constructor(f"!{_kind}:", _make_prefix_constructor(_kind))


def _construct_ref(loader: _Loader, node: yaml.Node) -> _Ref:
    if not isinstance(node, yaml.ScalarNode):
        raise yaml.constructor.ConstructorError(None, None, "!ref takes a scalar", node.start_mark)
    return _Ref(loader.construct_scalar(node))


_Loader.add_constructor("!ref", _construct_ref)


def _unknown_tag(loader: _Loader, tag_suffix: str, node: yaml.Node) -> None:
    raise yaml.constructor.ConstructorError(
        None, None, f"unsupported yaml tag !{tag_suffix}", node.start_mark
    )


_Loader.add_multi_constructor("!", _unknown_tag)

_REF_RE = re.compile(r"<([^<>]+)>")
_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


def _eval_arith(expr: str) -> Any:
    """Evaluate +-*/ arithmetic over number literals only (no names, no calls)."""

    def ev(n: ast.AST) -> Any:
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant) and isinstance(n.value, (int, float)):
            return n.value
        if isinstance(n, ast.BinOp) and type(n.op) in _BINOPS:
            return _BINOPS[type(n.op)](ev(n.left), ev(n.right))
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.USub, ast.UAdd)):
            return -ev(n.operand) if isinstance(n.op, ast.USub) else ev(n.operand)
        raise ValueError(expr)

    return ev(ast.parse(expr, mode="eval"))


class _Resolver:
    def __init__(self, root: dict, path: Path):
        self.root = root
        self.path = path
        self.stack: list[str] = []

    def lookup(self, name: str) -> Any:
        if name in self.stack:
            raise ConfigError(f"{self.path}: circular !ref <{name}>")
        cur: Any = self.root
        for part in re.split(r"[.\[\]]+", name.strip()):
            if not part:
                continue
            if isinstance(cur, Node):
                cur = cur.kwargs
            if not isinstance(cur, dict) or part not in cur:
                raise ConfigError(f"{self.path}: !ref <{name}> names no key in the config")
            cur = cur[part]
        self.stack.append(name)
        try:
            return self.resolve(cur)
        finally:
            self.stack.pop()

    def resolve_ref(self, ref: _Ref) -> Any:
        expr = ref.expr.strip()
        whole = _REF_RE.fullmatch(expr)
        if whole:
            return self.lookup(whole.group(1))
        values: list[Any] = []

        def sub(m: re.Match) -> str:
            values.append(self.lookup(m.group(1)))
            return repr(values[-1]) if isinstance(values[-1], (int, float)) else str(values[-1])

        text = _REF_RE.sub(sub, expr)
        if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            try:
                return _eval_arith(text)
            except (ValueError, SyntaxError, ZeroDivisionError):
                pass
        return text

    def resolve(self, obj: Any) -> Any:
        if isinstance(obj, _Ref):
            return self.resolve_ref(obj)
        if isinstance(obj, Node):
            obj.args = [self.resolve(a) for a in obj.args]
            obj.kwargs = {k: self.resolve(v) for k, v in obj.kwargs.items()}
            return obj
        if isinstance(obj, dict):
            for k in list(obj):
                obj[k] = self.resolve(obj[k])
            return obj
        if isinstance(obj, list):
            return [self.resolve(v) for v in obj]
        return obj


def load_hyperyaml(path: str | Path, overrides: dict | None = None) -> dict:
    """Read a hyperpyyaml file as data. ``overrides`` replace top-level keys before ``!ref``
    resolution (as hyperpyyaml's ``overrides=`` does). Nothing named in the file is executed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e}") from e
    try:
        loader = _Loader(text)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    if overrides:
        data.update(overrides)
    return _Resolver(data, path).resolve(data)
