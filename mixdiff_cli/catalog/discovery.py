"""Where the catalog is: --catalog, $MIXDIFF_CATALOG, the nearest experts.yaml up from here, the user data
folder, and the packaged demo (read only)."""

from __future__ import annotations

import os
from pathlib import Path

from mixdiff_cli.catalog.model import CATALOG_NAME
from mixdiff_cli.core.errors import (
    CatalogNotFound,
    ReadOnlyCatalog,
)


def user_data_dir() -> Path:
    """The platform's per-user data folder for mixdiff ($MIXDIFF_HOME overrides it)."""
    import sys

    if os.environ.get("MIXDIFF_HOME"):
        return Path(os.environ["MIXDIFF_HOME"]).expanduser()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "mixdiff"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "mixdiff"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "mixdiff"


def user_catalog_path() -> Path:
    return user_data_dir() / CATALOG_NAME


def packaged_data_dir() -> Path:
    """mixdiff's own package data (the embedded demo): read-only to every mixdiff command and function."""
    return Path(__file__).parent.parent / "data"


def packaged_catalog_path() -> Path:
    """The embedded demo catalog shipped as package data."""
    return packaged_data_dir() / "demo" / CATALOG_NAME


def is_packaged(path: str | Path) -> bool:
    """Whether `path` lies inside mixdiff's package data (links and `..` resolved)."""
    return Path(os.path.realpath(Path(path).expanduser())).is_relative_to(os.path.realpath(packaged_data_dir()))


def check_writable(*paths: str | Path | None) -> None:
    """Refuse to write inside the packaged demo: a user's changes go to a catalog of their own."""
    for path in paths:
        if path is not None and is_packaged(path):
            raise ReadOnlyCatalog(
                f"{path} is part of the packaged demo, which mixdiff never modifies",
                "run 'mixdiff init --from-demo' to start a catalog of your own from it, or pass --catalog PATH",
            )


def find_catalog(explicit: str | Path | None = None, *, must_exist: bool = True, for_write: bool = False) -> Path:
    """`--catalog`, then $MIXDIFF_CATALOG, then experts.yaml walking up from the cwd, then the user and
    packaged catalogs. With must_exist=False, return where a new catalog would go. With for_write=True
    (commands that change the catalog), never the packaged demo: without a catalog of the user's, fail."""
    path = _find_catalog(explicit, must_exist=must_exist, for_write=for_write)
    if for_write:
        check_writable(path)
    return path


def _find_catalog(explicit: str | Path | None, *, must_exist: bool, for_write: bool) -> Path:
    if explicit is not None:
        path = Path(explicit).expanduser()
        if path.is_dir():
            path = path / CATALOG_NAME
        if must_exist and not path.is_file():
            raise CatalogNotFound(f"catalog {path} does not exist", f"create it with 'mixdiff init --catalog {path}'")
        return path
    env = os.environ.get("MIXDIFF_CATALOG")
    if env:
        path = Path(env).expanduser()
        if must_exist and not path.is_file():
            raise CatalogNotFound(f"catalog {path} (from $MIXDIFF_CATALOG) does not exist", "create it with 'mixdiff init' or unset MIXDIFF_CATALOG")
        return path
    cwd = Path.cwd()
    if not must_exist:
        return cwd / CATALOG_NAME
    for folder in (cwd, *cwd.parents):
        if (folder / CATALOG_NAME).is_file():
            return folder / CATALOG_NAME
    for path in (user_catalog_path(), *([] if for_write else [packaged_catalog_path()])):
        if path.is_file():
            return path
    if for_write:
        raise CatalogNotFound(
            "no catalog here: run 'mixdiff init' to create one",
            "or pass --catalog PATH (the packaged demo catalog is read-only)",
        )
    raise CatalogNotFound(
        "no catalog found (no --catalog, no $MIXDIFF_CATALOG, no experts.yaml here or above, no user catalog)",
        "run 'mixdiff init --base PATH' to create one, or pass --catalog PATH",
    )
