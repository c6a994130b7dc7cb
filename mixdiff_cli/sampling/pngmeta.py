"""PNG metadata: an A1111-style `parameters` text chunk (read by existing tools) and a `mixdiff` JSON
chunk with the whole route, enough to reproduce the image (`mixdiff generate --from IMAGE.png`)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixdiff_cli.core.errors import MixdiffError
from mixdiff_cli.core.fsutil import atomic_path

PARAMETERS_KEY = "parameters"
RECORD_KEY = "mixdiff"
RECORD_FORMAT = "mixdiff/1"
SAMPLER_LABELS = {"ddim": "DDIM", "euler": "Euler", "euler-a": "Euler a", "dpm++": "DPM++ 2M"}
# A1111 modules/infotext_utils.py: `key: value` pairs, values optionally JSON-quoted
_PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


class MetadataError(MixdiffError):
    """An image without (valid) mixdiff metadata."""


def quote(value: Any) -> str:
    """A1111's quoting: values holding commas, colons or newlines become JSON strings."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text and '"' not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text


def _fmt_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def a1111_parameters(record: dict[str, Any]) -> str:
    """The `parameters` text A1111, ComfyUI readers and civitai parse."""
    lines = [record.get("prompt") or ""]
    if record.get("negative"):
        lines.append(f"Negative prompt: {record['negative']}")
    fields: list[tuple[str, Any]] = [
        ("Steps", record["steps"]),
        ("Sampler", SAMPLER_LABELS.get(record["scheduler"], record["scheduler"])),
        ("CFG scale", _fmt_number(record["guidance"])),
        ("Seed", record["seed"]),
        ("Size", f"{record['width']}x{record['height']}"),
    ]
    base = record.get("base") or {}
    if base.get("sha256"):
        fields.append(("Model hash", base["sha256"][:10]))
    if base.get("source"):
        fields.append(("Model", Path(str(base["source"]).rstrip("/")).name))
    loras = [e for e in record.get("experts", []) if e.get("kind") == "lora"]
    if loras:
        fields.append(("Lora hashes", ", ".join(f"{e['name']}: {(e.get('sha256') or '')[:10]}" for e in loras)))
    if record.get("experts"):
        fields.append(("Mixdiff experts", ", ".join(f"{e['name']}: {e['weight']:.4g}" + _band_text(e) for e in record["experts"])))
        fields.append(("Mixdiff blend", record.get("blend")))
    version = (record.get("versions") or {}).get("mixdiff")
    if version:
        fields.append(("Version", f"mixdiff {version}"))
    lines.append(", ".join(f"{key}: {quote(value)}" for key, value in fields))
    return "\n".join(lines)


def _band_text(expert: dict[str, Any]) -> str:
    """" @0.4-1" for an expert recorded with a band, else ""."""
    band = expert.get("band")
    return f" @{band[0]:g}-{band[1]:g}" if band else ""


def parse_a1111(text: str) -> dict[str, Any]:
    """Inverse of `a1111_parameters` (and of A1111's own infotext): prompt, negative, and the fields."""
    lines = text.strip().split("\n")
    last = lines[-1] if len(_PARAM_RE.findall(lines[-1])) >= 3 else ""
    body = lines[:-1] if last else lines
    prompt, negative, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    params = {key.strip(): _unquote(value.strip()) for key, value in _PARAM_RE.findall(last)}
    return {"prompt": "\n".join(prompt), "negative": "\n".join(negative), **params}


def save_png(image: Any, path: str | Path, record: dict[str, Any] | None = None) -> Path:
    """Write `image` as PNG with both chunks, atomically (over a file of that name). `record` defaults to
    `image.info["mixdiff"]`."""
    from PIL.PngImagePlugin import PngInfo

    record = record if record is not None else image.info.get(RECORD_KEY)
    info = PngInfo()
    if record is not None:
        info.add_text(PARAMETERS_KEY, a1111_parameters(record))
        info.add_text(RECORD_KEY, json.dumps(record, ensure_ascii=False, sort_keys=True))
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


def save_next_png(image: Any, out_dir: Path, seed: int, after: Path | None = None) -> Path:
    """Write `image` as `out_dir`'s next `NNNNN-SEED.png` (A1111 numbering; past `after`, the run's last image)
    and never over another file: the name is claimed with an exclusive hard link of the finished file, so two
    runs writing into one folder at once get two numbers and both images stay."""
    import os
    import uuid

    index = int(after.name[:5]) + 1 if after is not None else 1
    tmp = out_dir / f".{uuid.uuid4().hex}.png.partial"
    try:
        save_png(image, tmp)
        while True:
            index = max(index, next_index(out_dir))
            path = out_dir / f"{index:05d}-{seed}.png"
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                index += 1  # another run took this number since we looked
    finally:
        tmp.unlink(missing_ok=True)


def next_index(out_dir: Path) -> int:
    """A1111-style numbering: one more than the highest `NNNNN-*.png` already in the folder."""
    numbers = [int(p.name[:5]) for p in out_dir.glob("[0-9][0-9][0-9][0-9][0-9]-*.png")]
    return max(numbers, default=0) + 1


@dataclass
class PngMeta:
    parameters: str | None
    record: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return {"parameters": self.parameters, "mixdiff": self.record}


def read_png(path: str | Path) -> PngMeta:
    """Both metadata chunks of a PNG (either may be None)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            text = dict(getattr(im, "text", None) or im.info)
    except FileNotFoundError:
        raise MetadataError(f"{path} does not exist", "pass a PNG written by 'mixdiff generate'") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise MetadataError(f"{path} is not a readable image ({exc})", "pass a PNG written by 'mixdiff generate'") from None
    record = None
    if RECORD_KEY in text:
        try:
            record = json.loads(text[RECORD_KEY])
        except json.JSONDecodeError:
            raise MetadataError(f"{path}: the mixdiff metadata chunk is not valid JSON", "the file was edited or truncated") from None
    params = text.get(PARAMETERS_KEY)
    return PngMeta(parameters=str(params) if params is not None else None, record=record)


def read_record(path: str | Path) -> dict[str, Any]:
    """The `mixdiff` record of a PNG, or a clear error."""
    meta = read_png(path)
    if meta.record is None:
        what = "only A1111 parameters" if meta.parameters else "no generation metadata"
        raise MetadataError(f"{path} has {what}, no mixdiff record", "pass a PNG written by 'mixdiff generate'")
    if not isinstance(meta.record, dict) or meta.record.get("format") != RECORD_FORMAT:
        found = meta.record.get("format") if isinstance(meta.record, dict) else type(meta.record).__name__
        raise MetadataError(f"{path}: unknown mixdiff record format {found!r}", "upgrade mixdiff")
    _check_record(meta.record, path)
    return meta.record


_NUMBER, _TEXT, _WHOLE, _LIST, _MAP = "a number", "text", "a whole number", "a list", "a mapping"
_FIELDS = {  # what a record's replayed fields hold; None is allowed for those not in _REQUIRED_FIELDS
    "prompt": _TEXT, "negative": _TEXT, "seed": _WHOLE, "steps": _WHOLE, "guidance": _NUMBER, "width": _WHOLE,
    "height": _WHOLE, "scheduler": _TEXT, "experts": _LIST, "regions": _LIST, "canvas": _MAP, "catalog": _MAP, "base": _MAP,
}
_REQUIRED_FIELDS = ("prompt", "seed", "steps", "scheduler")
_EXPERT_FIELDS = {"name": _TEXT, "weight": _NUMBER}


def _kind_ok(value: Any, want: str) -> bool:
    if isinstance(value, bool):
        return False
    return {_NUMBER: isinstance(value, (int, float)), _TEXT: isinstance(value, str), _WHOLE: isinstance(value, int),
            _LIST: isinstance(value, list), _MAP: isinstance(value, dict)}[want]


def _check_record(record: dict[str, Any], path: str | Path) -> None:
    """Every field a replay reads has the type mixdiff writes, so an edited record is refused in one line."""
    bad = lambda what: MetadataError(f"{path}: the mixdiff record's {what}", "the file was edited; pass a PNG written by 'mixdiff generate'")  # noqa: E731
    for key, want in _FIELDS.items():
        value = record.get(key)
        if value is None:
            if key in _REQUIRED_FIELDS:
                raise bad(f"{key} is missing")
        elif not _kind_ok(value, want):
            raise bad(f"{key} is {type(value).__name__} {json.dumps(value)[:40]}, not {want}")
    for i, expert in enumerate(record.get("experts") or [], start=1):
        if not isinstance(expert, dict):
            raise bad(f"expert {i} is not a mapping")
        for key, want in _EXPERT_FIELDS.items():
            if not _kind_ok(expert.get(key), want):
                raise bad(f"expert {i}'s {key} is {json.dumps(expert.get(key))[:40]}, not {want}")


def replay(record: dict[str, Any]) -> tuple[dict[str, Any], list[list[Any]], str | None]:
    """(Request fields, chosen experts as [name, weight] or [name, weight, band], blend mode) that
    reproduce a record."""
    request = {key: record[key] for key in ("prompt", "negative", "seed", "steps", "guidance", "width", "height", "scheduler")}
    chosen = [[e["name"], float(e["weight"])] + ([e["band"]] if e.get("band") else []) for e in record.get("experts", [])]
    label = record.get("blend")
    blend = "merge" if label in ("merge", "merge+noise", "bands+merge") else "noise" if label in ("noise", "bands+noise") else None
    return request, chosen, blend
