"""Prompt files for batch generation: `.txt` (one prompt per line, inline overrides), `.jsonl`, `.csv`
(header row) and `.yaml`. Every item keeps the line it came from, for errors, and a stable id.

    a red fox in the snow --n blurry, dark --seed 7 --steps 20 --w 64 --h 64 --expert watercolor:0.7

Import-light: no torch here.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixdiff_cli.core.errors import MixdiffError
from mixdiff_cli.routing.route import RouteSpecError, parse_member
from mixdiff_cli.sampling.options import MAX_GUIDANCE, MAX_SEED, MAX_SIDE, MAX_STEPS, SCHEDULERS

SUFFIXES = (".txt", ".jsonl", ".csv", ".yaml", ".yml")
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

# field -> accepted spellings (record keys in jsonl/csv/yaml; `--option` in txt lines)
ALIASES: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt",),
    "negative": ("negative", "negative_prompt", "n", "neg"),
    "seed": ("seed",),
    "steps": ("steps",),
    "guidance": ("guidance", "cfg", "guidance_scale"),
    "width": ("width", "w"),
    "height": ("height", "h"),
    "scheduler": ("scheduler", "sampler"),
    "experts": ("experts", "expert"),
    "id": ("id",),
    "regions": ("regions",),
}
_FIELD = {alias: name for name, aliases in ALIASES.items() for alias in aliases}
_TXT_OPTIONS = {alias: name for alias, name in _FIELD.items() if name not in ("prompt", "id", "regions")}
# `--name`, `--name=` or a short flag of `generate` (`-n`), at the start of the line or after whitespace
_OPTION_RE = re.compile(r"(?:(?<=\s)|^)(?:--([A-Za-z][\w-]*)|-([A-Za-z]))(?:=|(?=\s)|$)")
# generate's short flags: those an item may set, and those that belong to the whole run
_SHORT = {"n": "negative", "g": "guidance", "W": "width", "H": "height", "e": "expert"}
_RUN_FLAGS = {"N": "--num-images", "b": "--batch-size", "k": "--top-k", "o": "--out", "c": "--catalog", "q": "--quiet", "r": "--region"}


class PromptFileError(MixdiffError):
    """A prompt file, or one line of it, that cannot be read."""

    def __init__(self, message: str, hint: str | None = None, *, line: int | None = None):
        super().__init__(message, hint)
        self.line = line


@dataclass(frozen=True)
class PromptItem:
    """One image to make, as written in the file: None means "use the run's default"."""

    index: int  # position among the file's items (0-based, malformed items counted): seeds = base + index
    line: int  # 1-based line where the item starts
    prompt: str
    negative: str | None = None
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None
    experts: tuple[tuple[Any, ...], ...] = ()  # per-item expert overrides: (name, weight) or (name, weight, (start, end))
    user_id: str | None = None  # an explicit `id` from the file
    regions: tuple[str, ...] = ()  # `BOX=TEXT` specs of a regional canvas (.jsonl / .yaml `regions:`); prompt = the background

    @property
    def id(self) -> str:
        """Stable across runs: the explicit id, else index and a hash of the item's content."""
        if self.user_id:
            return self.user_id
        content = json.dumps(
            [self.index, self.prompt, self.negative, self.seed, self.steps, self.guidance, self.width, self.height,
             self.scheduler, [list(e) for e in self.experts]] + ([list(self.regions)] if self.regions else []),
            ensure_ascii=False,
        )
        return f"{self.index:05d}-{hashlib.sha256(content.encode()).hexdigest()[:8]}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "index": self.index, "line": self.line, "prompt": self.prompt, "negative": self.negative,
            "seed": self.seed, "steps": self.steps, "guidance": self.guidance, "width": self.width,
            "height": self.height, "scheduler": self.scheduler, "experts": [list(e) for e in self.experts],
            **({"regions": list(self.regions)} if self.regions else {}),
        }


@dataclass
class PromptFile:
    """A parsed prompt file: the good items and one error per malformed item (in file order)."""

    path: Path
    items: list[PromptItem] = field(default_factory=list)
    errors: list[PromptFileError] = field(default_factory=list)

    def raise_first(self) -> None:
        if self.errors:
            raise self.errors[0]


# --- values ---------------------------------------------------------------------------------------


class _Bad(Exception):
    """A bad value inside one item: turned into a PromptFileError with the file and line."""

    def __init__(self, what: str, hint: str):
        super().__init__(what)
        self.what, self.hint = what, hint


def _int(key: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise _Bad(f"{key} must be an integer, got {value!r}", f"write e.g. {key} 20") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Bad(f"{key} must be an integer, got {value!r}", f"write e.g. {key} 20")
    if value < low or (high is not None and value > high):
        span = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise _Bad(f"{key} must be {span}, got {value}", f"fix the {key} value")
    return value


def _float(key: str, value: Any, low: float, high: float = float("inf")) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise _Bad(f"{key} must be a number, got {value!r}", f"write e.g. {key} 7.5") from None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        raise _Bad(f"{key} must be a number, got {value!r}", f"write e.g. {key} 7.5")
    if not low <= value <= high:
        span = f"from {low:g} to {high:g}" if high != float("inf") else f"at least {low:g}"
        raise _Bad(f"{key} must be a number {span}, got {value}", f"fix the {key} value")
    return float(value)


def _text(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _Bad(f"{key} must be text, got {value!r}", f"quote the {key}")
    return value


def _size(key: str, value: Any) -> int:
    size = _int(key, value, 8, MAX_SIDE)
    if size % 8:
        raise _Bad(f"{key} must be a multiple of 8, got {size}", f"use e.g. {size // 8 * 8 or 8}")
    return size


def _expert(spec: Any) -> tuple[Any, ...]:
    """One expert spec (`NAME[:WEIGHT][@START:END]`, or [name, weight(, band)]) -> (name, weight) or
    (name, weight, (start, end)), by the one route grammar."""
    try:
        m = parse_member(spec)
    except RouteSpecError as exc:
        raise _Bad(exc.message, exc.hint or "") from None
    return (m.expert, m.weight) if m.band is None else (m.expert, m.weight, m.band)


def _split_specs(text: str) -> list[str]:
    """`a:0.7, b` or `a:0.7 b` -> ["a:0.7", "b"] (commas win, so `a: 0.7, b` works too)."""
    parts = text.split(",") if "," in text else text.split()
    return [p.strip() for p in parts if p.strip()]


def _experts(value: Any) -> tuple[tuple[Any, ...], ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, dict):  # {name: weight}
        specs: list[Any] = [[k, v] for k, v in value.items()]
    elif isinstance(value, str):
        specs = _split_specs(value)
    elif isinstance(value, list):
        specs = value
    else:
        raise _Bad(f"experts must be a name, a list or a mapping, got {value!r}", 'write e.g. "experts": ["watercolor:0.7"]')
    out = [_expert(s) for s in specs]
    names = [e[0] for e in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise _Bad(f"expert {dup} is given twice", "name each expert once")
    return tuple(out)


_CHECK = {
    "prompt": _text,
    "negative": _text,
    "seed": lambda k, v: _int(k, v, 0, MAX_SEED),
    "steps": lambda k, v: _int(k, v, 1, MAX_STEPS),
    "guidance": lambda k, v: _float(k, v, 0.0, MAX_GUIDANCE),
    "width": _size,
    "height": _size,
    "scheduler": lambda k, v: _scheduler(k, v),
    "id": lambda k, v: _id(k, v),
}


def _regions(value: Any) -> tuple[str, ...]:
    """`regions:` a list of "BOX=TEXT" specs or {box, prompt, experts} mappings -> "BOX=TEXT" specs (their
    grammar is checked by `sampling.regions.parse_region` when the batch validates its items)."""
    if not isinstance(value, list) or not value:
        raise _Bad("regions must be a non-empty list", 'write e.g. "regions": ["0:0.5,0:1=a snowy landscape --expert winter"]')
    specs = []
    for i, item in enumerate(value, start=1):
        if isinstance(item, dict) and "box" in item and set(item) <= {"box", "prompt", "experts"}:
            pinned = "".join(f" --expert {parse_member(e).spec()}" for e in _experts(item.get("experts")))
            item = f"{item['box']}={item.get('prompt') or ''}{pinned}"
        if not isinstance(item, str):
            raise _Bad(f"region {i} is neither BOX=TEXT nor {{box, prompt, experts}}", 'write e.g. {"box": "0:0.5,0:1", "prompt": "a snowy landscape"}')
        specs.append(item.strip())
    return tuple(specs)


def _scheduler(key: str, value: Any) -> str:
    value = _text(key, value).strip()
    if value not in SCHEDULERS:
        raise _Bad(f"unknown scheduler {value!r}", f"use one of: {', '.join(SCHEDULERS)}")
    return value


def _id(key: str, value: Any) -> str:
    value = str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else value
    if not isinstance(value, str) or not ID_RE.match(value):
        raise _Bad(f"id {value!r} is not a usable file name", "use letters, digits, '.', '_' or '-' (at most 128)")
    return value


def make_item(index: int, line: int, record: dict[str, Any], *, spelled: str = "key") -> PromptItem:
    """Validate one record (field -> raw value) into an item. Raises _Bad."""
    fields_: dict[str, Any] = {}
    for key, value in record.items():
        name = _FIELD.get(key.strip().lower() if isinstance(key, str) else key)
        if name is None:
            known = ", ".join(sorted(_TXT_OPTIONS if spelled == "option" else _FIELD))
            shown = f"--{key}" if spelled == "option" else f"'{key}'"
            raise _Bad(f"unknown {spelled} {shown}", f"known: {known}")
        if name in fields_:
            raise _Bad(f"{name} is given twice", "keep one of them")
        if value is None or (isinstance(value, str) and value.strip() == "" and name != "prompt"):
            continue  # an empty cell: use the default
        fields_[name] = _experts(value) if name == "experts" else _regions(value) if name == "regions" else _CHECK[name](name, value)
    prompt = (fields_.pop("prompt", None) or "").strip()
    if not prompt and not fields_.get("regions"):
        raise _Bad("no prompt", "write the prompt first (txt) or give a 'prompt' value")
    user_id = fields_.pop("id", None)
    return PromptItem(index=index, line=line, prompt=prompt, user_id=user_id, **fields_)


# --- formats --------------------------------------------------------------------------------------


def _strip_quotes(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


def parse_txt_line(text: str) -> dict[str, Any]:
    """`PROMPT --opt VALUE ...` -> raw record. `--expert` may repeat; other options may not."""
    marks = list(_OPTION_RE.finditer(text))
    record: dict[str, Any] = {"prompt": text[: marks[0].start()] if marks else text}
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        short, value = mark.group(2), _strip_quotes(text[mark.end():end])
        if short is not None and short in _RUN_FLAGS:
            raise _Bad(f"-{short} ({_RUN_FLAGS[short]}) applies to the whole run, not to one item", f"pass {_RUN_FLAGS[short]} on the command line")
        key = mark.group(1) or _SHORT.get(short, short)
        shown = f"-{short}" if short is not None else f"--{key}"
        name = _TXT_OPTIONS.get(key.lower())
        if name is None:
            raise _Bad(f"unknown option {shown}", "known: " + ", ".join(f"--{k}" for k in sorted(_TXT_OPTIONS)))
        if not value:
            raise _Bad(f"{shown} needs a value", f"write e.g. {shown} VALUE")
        if name == "experts":
            record.setdefault("experts", []).extend(_split_specs(value))
            continue
        if name in ("seed", "steps", "guidance", "width", "height", "scheduler") and len(value.split()) > 1:
            raise _Bad(f"{shown} takes one value, got {value!r}", "put the prompt text before the first --option")
        if name in record:
            raise _Bad(f"{shown} is given twice", "keep one of them")
        record[name] = value
    return record


def lines(text: str) -> list[str]:
    """`text`'s lines, split at line feeds only: U+2028, U+0085 or a form feed inside a line belong to it
    (`str.splitlines` would split there, and JSON strings may hold them)."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _records_txt(text: str) -> Iterator[tuple[int, Any]]:
    for number, raw in enumerate(lines(text), start=1):
        line = raw.strip()
        if line and not line.startswith("#"):
            yield number, line


def _records_jsonl(text: str) -> Iterator[tuple[int, Any]]:
    for number, raw in enumerate(lines(text), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, _Bad(f"not valid JSON ({exc.msg} at column {exc.colno})", 'write one object per line, e.g. {"prompt": "a red fox"}')
        except RecursionError:
            yield number, _too_deep()


def _records_csv(text: str) -> Iterator[tuple[int, Any]]:
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))  # a cell may be as long as the file (default: 131,072)
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except StopIteration:
        return
    header = [h.strip() for h in header]
    if "prompt" not in [h.lower() for h in header]:
        yield 1, _Bad(f"the header row has no 'prompt' column (got {', '.join(header) or 'nothing'})", "start the file with a header row such as: prompt,seed,steps")
        return
    start = reader.line_num + 1
    for row in reader:
        number, start = start, reader.line_num + 1
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            yield number, _Bad(f"{len(row)} cells for {len(header)} columns", "quote cells that contain commas")
            continue
        yield number, dict(zip(header, row))


def _records_yaml(text: str) -> Iterator[tuple[int, Any]]:
    import yaml

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        yield 1, _too_deep()
        return
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        yield (mark.line + 1 if mark else 1), _Bad(f"YAML syntax error: {problem}", "fix the file (indentation, quotes, colons)")
        return
    if root is None:
        return
    nodes = root.value if isinstance(root, yaml.SequenceNode) else None
    if isinstance(root, yaml.MappingNode):  # {prompts: [...]}
        for key, value in root.value:
            if key.value == "prompts" and isinstance(value, yaml.SequenceNode):
                nodes = value.value
            else:
                yield key.start_mark.line + 1, _Bad(f"unknown key '{key.value}'", "write a list of prompts, or 'prompts:' followed by one")
                return
    if nodes is None:
        yield root.start_mark.line + 1, _Bad("expected a list of prompts", "write '- a red fox' or '- {prompt: a red fox, seed: 1}' items")
        return
    for node in nodes:
        loader = yaml.SafeLoader("")
        try:
            value = loader.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            value = _Bad(f"bad value: {exc}", "fix the item")
        except RecursionError:
            value = _too_deep()
        finally:
            loader.dispose()
        yield node.start_mark.line + 1, value


def _too_deep() -> _Bad:
    return _Bad("values nested too deeply to read", "write each item as a prompt, or as one object with a prompt and its settings")


def _read_text(path: Path) -> str:
    if str(path) == "-":
        return sys.stdin.read()
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise PromptFileError(f"prompt file {path} does not exist", "check the path passed to --prompts") from None
    except IsADirectoryError:
        raise PromptFileError(f"prompt file {path} is a folder", "pass a .txt, .jsonl, .csv or .yaml file") from None
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"prompt file {path} is not UTF-8 text (byte {exc.start})", "save it as UTF-8") from None


def parse_prompts(path: str | Path, text: str | None = None) -> PromptFile:
    """Read every item of a prompt file, collecting one error per malformed item (with its line)."""
    path = Path(path)
    suffix = ".txt" if str(path) == "-" else path.suffix.lower()
    if suffix not in SUFFIXES:
        raise PromptFileError(f"unsupported prompt file type {suffix or '(none)'!r} for {path}", "use .txt, .jsonl, .csv or .yaml")
    text = _read_text(path) if text is None else text
    records = {
        ".txt": lambda: _records_txt(text),
        ".jsonl": lambda: _records_jsonl(text),
        ".csv": lambda: _records_csv(text),
        ".yaml": lambda: _records_yaml(text),
        ".yml": lambda: _records_yaml(text),
    }[suffix]()
    result = PromptFile(path)
    seen_ids: dict[str, int] = {}
    for index, (line, raw) in enumerate(records):
        try:
            if isinstance(raw, _Bad):
                raise raw
            if suffix == ".txt":
                item = make_item(index, line, parse_txt_line(raw), spelled="option")
            elif isinstance(raw, str):
                item = make_item(index, line, {"prompt": raw})
            elif isinstance(raw, dict):
                item = make_item(index, line, raw)
            else:
                raise _Bad(f"expected a prompt or an object, got {type(raw).__name__}", 'write e.g. {"prompt": "a red fox"}')
            if item.id in seen_ids:
                raise _Bad(f"id {item.id!r} is already used on line {seen_ids[item.id]}", "give every item its own id")
            seen_ids[item.id] = line
            result.items.append(item)
        except _Bad as bad:
            result.errors.append(PromptFileError(f"{path}:{line}: {bad.what}", bad.hint, line=line))
    if not result.items and not result.errors:
        raise PromptFileError(f"prompt file {path} holds no prompts", "write one prompt per line ('#' starts a comment)")
    return result


def load_prompts(path: str | Path) -> list[PromptItem]:
    """The items of a prompt file; the first malformed item raises PromptFileError (with its line)."""
    parsed = parse_prompts(path)
    parsed.raise_first()
    return parsed.items
