"""An evaluation's `Report` (numbers, markdown, figures), its common JSON header, and `write_report`."""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mixdiff_cli.core.errors import MixdiffError

if TYPE_CHECKING:
    from PIL import Image

    from mixdiff_cli.catalog.model import Catalog

ReportKind = Literal["routing", "experts", "samples"]
REPORT_FORMAT = "mixdiff-evaluate/1"


class EvaluateError(MixdiffError):
    """Evaluation inputs that cannot be used (labels, prompt files, data folders, CLIP model)."""


class GateFailed(MixdiffError):
    """A quality gate (--min-accuracy, --max-loss-ratio) was not met; the report is still written."""


@dataclass
class Report:
    """What one evaluation produced: `data` (report.json), `markdown` (report.md) and PNG figures."""

    kind: ReportKind
    data: dict[str, Any]
    markdown: str
    figures: dict[str, Image.Image] = field(default_factory=dict)  # file name -> figure
    images: dict[str, Image.Image] = field(default_factory=dict)  # relative path -> rendered sample

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [g for g in self.data.get("gates", []) if not g["passed"]]

    def check(self) -> None:
        """Raise `GateFailed` when a gate was not met."""
        failed = self.failed
        if failed:
            where = self.data.get("files", {}).get("report.md", "report.md")
            raise GateFailed("quality gate failed: " + "; ".join(g["detail"] for g in failed), f"see {where} for the details")

    def to_dict(self) -> dict[str, Any]:
        return self.data


def _versions() -> dict[str, str]:
    from mixdiff_cli.core.runtime import versions

    return versions()


def report_header(kind: ReportKind, cat: Catalog, settings: dict[str, Any], seeds: dict[str, Any]) -> dict[str, Any]:
    """The fields every report.json starts with: format, kind, time, catalog, versions, settings, seeds."""
    return {
        "format": REPORT_FORMAT,
        "kind": kind,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "catalog": {"path": str(cat.path), "hash": cat.hash(), "base": cat.base.to_dict() if cat.base else None,
                    "router": cat.router, "experts": cat.names},
        "versions": _versions(),
        "settings": settings,
        "seeds": seeds,
    }


def write_report(report: Report, out_dir: str | Path) -> dict[str, Path]:
    """report.json, report.md, figures and samples into `out_dir`, each written atomically."""
    from mixdiff_cli.core.fsutil import atomic_path, atomic_write

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise EvaluateError(f"--out {out_dir} is a file", "pass a folder for the report")
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for rel, image in {**report.images, **report.figures}.items():
        path = out_dir / rel
        if "mixdiff" in image.info:
            from mixdiff_cli.sampling.pngmeta import save_png

            save_png(image, path)
        else:
            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG")
        written[rel] = path
    report.data["files"] = {**{rel: str(p) for rel, p in written.items()}, "report.json": str(out_dir / "report.json"),
                            "report.md": str(out_dir / "report.md")}
    written["report.md"] = atomic_write(out_dir / "report.md", report.markdown)
    written["report.json"] = atomic_write(out_dir / "report.json", json.dumps(report.data, indent=2, default=_jsonable) + "\n")
    return written


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
