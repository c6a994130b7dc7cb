"""Where expert and base files come from: local paths, or `hf://org/repo[/file]@revision` via the HF cache."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from mixdiff_cli.core.errors import HubError


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    filename: str | None
    revision: str | None

    def __str__(self) -> str:
        path = f"{self.repo_id}/{self.filename}" if self.filename else self.repo_id
        return f"hf://{path}" + (f"@{self.revision}" if self.revision else "")


def parse_hub(source: str) -> HubRef:
    """`hf://org/repo[/path/in/repo]@revision` -> HubRef."""
    body = source.removeprefix("hf://")
    body, _, revision = body.partition("@")
    parts = body.strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise HubError(f"bad hub source {source!r}", "write hf://org/repo[/file.safetensors]@revision")
    filename = "/".join(parts[2:]) or None
    return HubRef("/".join(parts[:2]), filename, revision or None)


def is_hub(source: str) -> bool:
    return source.startswith("hf://")


def fetch(source: str) -> Path:
    """Resolve a hub source through huggingface_hub's cache; honours HF_HUB_OFFLINE."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    ref = parse_hub(source)
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    try:
        if ref.filename:
            return Path(hf_hub_download(ref.repo_id, ref.filename, revision=ref.revision))
        return Path(snapshot_download(ref.repo_id, revision=ref.revision))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        hint = (
            "HF_HUB_OFFLINE is set: download it once with network access (`hf download "
            f"{ref.repo_id}`) or unset HF_HUB_OFFLINE"
            if offline
            else f"check your network, or download it with `hf download {ref.repo_id}`"
        )
        raise HubError(f"{ref} is not in the local Hugging Face cache", hint) from None
    except HfHubHTTPError as exc:
        raise HubError(f"could not fetch {ref}: {str(exc).splitlines()[0]}", "check the repo id, file and revision") from None


def pin(source: str, local: Path) -> str:
    """``source`` pinned to the commit its cached copy ``local`` came from: hf://org/repo[/file]@<40-hex sha>.

    huggingface_hub keeps every download under ``snapshots/<commit>/``, so a branch or tag (or no
    revision: main) resolves to the commit actually hashed; a later push to the branch cannot change
    what the catalog names. A path outside that layout leaves ``source`` as it is.
    """
    ref = parse_hub(source)
    parts = Path(local).parts
    if "snapshots" not in parts[:-1]:
        return source
    commit = parts[len(parts) - 1 - parts[::-1].index("snapshots") + 1]
    if not re.fullmatch(r"[0-9a-f]{40}", commit):
        return source
    return str(HubRef(ref.repo_id, ref.filename, commit))


def resolve(catalog, source: str) -> Path:
    """A catalog source (relative to the catalog, absolute, or hf://) as a local path."""
    return fetch(source) if is_hub(source) else catalog.resolve(source)
