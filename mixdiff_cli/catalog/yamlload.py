"""Strict loading of `experts.yaml`: safe YAML nodes checked field by field, errors naming file and line."""

from __future__ import annotations

import datetime
import re
from pathlib import Path
from typing import Any

import yaml

from mixdiff_cli import families
from mixdiff_cli.catalog.model import (
    FORMATS,
    KINDS,
    SCHEMA_VERSION,
    Base,
    Catalog,
    Expert,
    check_name,
)
from mixdiff_cli.core.errors import CatalogError, InvalidName

# --- strict loading -------------------------------------------------------------------------------

_STR, _INT, _NUM, _STRLIST = "a string", "an integer", "a number", "a list of strings"
_BAND = "a band [start, end] with 0 <= start < end <= 1"


def _spec(cls: type) -> dict[str, str | tuple[str, ...]]:
    specs: dict[type, dict[str, str | tuple[str, ...]]] = {
        Expert: {
            "name": _STR, "kind": KINDS, "source": _STR, "format": FORMATS, "sha256": _STR, "rank": _INT,
            "alpha": _NUM, "arch": families.names(), "description": _STR, "prompts": _STRLIST, "trigger": _STRLIST,
            "default_weight": _NUM, "tags": _STRLIST, "title": _STR, "preview": _STR, "added": _STR, "band": _BAND,
        },
        Base: {"source": _STR, "arch": families.names(), "sha256": _STR, "guidance": _NUM},
    }
    return specs[cls]


_REQUIRED = {Expert: ("name", "kind", "source", "format"), Base: ("source",)}


# libyaml's parser when PyYAML was built with it (`yaml.__with_libyaml__`): the same nodes and marks, ~10x faster
_PARSER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def _construct(node: yaml.Node) -> Any:
    """A scalar node's value under the safe schema (a plain string without constructing anything)."""
    if node.tag == "tag:yaml.org,2002:str":
        return node.value
    return yaml.constructor.SafeConstructor().construct_object(node, deep=True)


EXPANSION = 8  # a catalog's values, aliases (*name) expanded, may take this many times its text (at least EXPANSION_MIN)
EXPANSION_MIN = 4 << 20


class _Loader:
    def __init__(self, path: Path):
        self.path = path
        self.spans: list[tuple[int, int]] | None = None  # each expert's item in the text (see `_item_spans`)
        self.budget = EXPANSION_MIN  # characters of values left to read (an alias re-reads its anchor's)

    def spend(self, node: yaml.ScalarNode) -> None:
        """Count a value read; without aliases the values fit in the text, so only an alias bomb runs out."""
        self.budget -= len(node.value) + 1
        if self.budget < 0:
            raise self.fail(node, "the catalog's YAML aliases (*name) expand to far more than the file holds",
                            "write the repeated values out, or use fewer aliases of long lists")

    def fail(self, node: yaml.Node | None, what: str, hint: str) -> CatalogError:
        line = f":{node.start_mark.line + 1}" if node is not None else ""
        return CatalogError(f"{self.path}{line}: {what}", hint)

    def scalar(self, node: yaml.Node, want: str | tuple[str, ...], key: str) -> Any:
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            return None
        if isinstance(node, yaml.ScalarNode):
            self.spend(node)
        try:
            value = _construct(node) if isinstance(node, yaml.ScalarNode) else None
        except yaml.YAMLError:  # a tag the safe loader does not know (!!python/..., !custom): never constructed
            raise self.fail(node, f"{key} has the tag {node.tag!r}", "write a plain value: a catalog holds no Python objects") from None
        if want == _STR and isinstance(value, (datetime.date, datetime.datetime)):
            value = value.isoformat()  # an unquoted `added: 2026-11-26` is a date to YAML
        ok = {
            _STR: isinstance(value, str),
            _INT: isinstance(value, int) and not isinstance(value, bool),
            _NUM: isinstance(value, (int, float)) and not isinstance(value, bool),
        }
        if isinstance(want, tuple):
            if value not in want:
                raise self.fail(node, f"{key} is {value!r}", f"use one of: {', '.join(want)}")
            return value
        if want == _BAND:
            bounds = [self.scalar(item, _NUM, f"{key}[{i}]") for i, item in enumerate(node.value)] if isinstance(node, yaml.SequenceNode) else []
            if len(bounds) != 2 or None in bounds or not 0 <= bounds[0] < bounds[1] <= 1:
                raise self.fail(node, f"{key} must be {_BAND}", f"write e.g. {key}: [0.8, 1.0] (the last 20% of the run)")
            return bounds
        if want == _STRLIST:
            if not isinstance(node, yaml.SequenceNode):
                raise self.fail(node, f"{key} must be {_STRLIST}", f"write e.g. {key}: [\"a watercolor painting\"]")
            items = [self.scalar(item, _STR, f"{key}[{i}]") for i, item in enumerate(node.value)]
            return [str(x) for x in items if x is not None]
        if not ok[want]:
            shown = "a mapping" if isinstance(node, yaml.MappingNode) else "a list" if isinstance(node, yaml.SequenceNode) else repr(value)
            raise self.fail(node, f"{key} must be {want}, got {shown}", f"fix the value of '{key}'")
        return float(value) if want == _NUM else value

    def mapping(self, node: yaml.Node, cls: type, where: str) -> Any:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{where} must be a mapping", "see README.md, 'The catalog', for the format")
        spec = _spec(cls)
        values: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if key not in spec:
                raise self.fail(key_node, f"unknown key '{key}' in {where}", f"allowed keys: {', '.join(spec)}")
            if key in values:
                raise self.fail(key_node, f"duplicate key '{key}' in {where}", "keep one of them")
            values[key] = self.scalar(value_node, spec[key], key)
        for key in _REQUIRED[cls]:
            if values.get(key) is None:
                raise self.fail(node, f"{where} has no '{key}'", f"add '{key}:' to it")
        return cls(**{k: v for k, v in values.items() if v is not None})

    def catalog(self, text: str) -> Catalog:
        self.budget = max(EXPANSION * len(text), EXPANSION_MIN)
        try:
            root = yaml.compose(text, Loader=_PARSER)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise CatalogError(f"{self.path}{line}: YAML syntax error: {problem}", "fix the file (indentation, quotes, colons)") from None
        if root is None:
            return Catalog(path=self.path)
        if not isinstance(root, yaml.MappingNode):
            raise self.fail(root, "the catalog must be a mapping with version, base, router and experts", "see README.md, 'The catalog'")
        cat = Catalog(path=self.path)
        seen: set[str] = set()
        for key_node, value_node in root.value:
            key = key_node.value
            if key in seen:
                raise self.fail(key_node, f"duplicate key '{key}'", "keep one of them")
            seen.add(key)
            if key == "version":
                cat.version = self.scalar(value_node, _INT, "version")
                if cat.version != SCHEMA_VERSION:
                    raise self.fail(value_node, f"catalog version {cat.version} is not supported", f"this mixdiff reads version {SCHEMA_VERSION}; upgrade mixdiff")
            elif key == "base":
                null = isinstance(value_node, yaml.ScalarNode) and value_node.tag.endswith(":null")
                cat.base = None if null else self.mapping(value_node, Base, "base")
            elif key == "router":
                cat.router = self.scalar(value_node, _STR, "router")
            elif key == "experts":
                null = isinstance(value_node, yaml.ScalarNode) and value_node.tag.endswith(":null")
                if not null and not isinstance(value_node, yaml.SequenceNode):
                    raise self.fail(value_node, "experts must be a list", "write 'experts:' followed by '- name: ...' items")
                names: set[str] = set()
                for item in [] if null else value_node.value:
                    exp = self.mapping(item, Expert, "an expert")
                    try:
                        check_name(exp.name)
                    except InvalidName as exc:
                        raise self.fail(item, exc.message, exc.hint or "") from None
                    if exp.name in names:
                        raise self.fail(item, f"expert name '{exp.name}' appears twice", "names must be unique; rename or remove one")
                    names.add(exp.name)
                    cat.experts.append(exp)
                last = root.value[-1][0] is key_node
                self.spans = _item_spans(text, value_node) if last and not null else None
            else:
                raise self.fail(key_node, f"unknown key '{key}'", "allowed keys: version, base, router, experts")
        return cat


def _item_spans(text: str, seq: yaml.Node) -> list[tuple[int, int]] | None:
    """Each item of the final `experts:` block list as [start, end) in `text`: from its '- ' line to the next
    item's (comments between them go with the item before), the last to the end of the text. None unless
    every item starts a line with '- ' at column 0, as `save_catalog` writes them."""
    if not isinstance(seq, yaml.SequenceNode) or seq.flow_style:
        return None
    starts = [0] + [m.end() for m in re.finditer("\n", text)]
    lines = [item.start_mark.line for item in seq.value]
    if any(item.start_mark.column != 2 or not text.startswith("- ", starts[line]) for item, line in zip(seq.value, lines)):
        return None
    bounds = [starts[line] for line in lines] + [len(text)]
    if re.search(r"^(---|\.\.\.)", text[bounds[-2] :], re.MULTILINE):  # a document marker after the list: items go before it
        return None
    return list(zip(bounds[:-1], bounds[1:]))
