"""Training checkpoints without pickle: a folder of weights and optimizer tensors (safetensors) and the
rest as JSON (`state.json`), written whole or not at all. Used by fine-tune and the demo build."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixdiff_cli.core.fsutil import atomic_folder

if TYPE_CHECKING:
    import torch

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"


def flatten_optimizer(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch optimizer state_dict -> (tensors `state.<param>.<slot>` for safetensors, the JSON-able rest)."""
    import torch

    tensors, scalars = {}, {}
    for pid, slots in state["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: Mapping[str, torch.Tensor], rest: Mapping[str, Any]) -> dict[str, Any]:
    """The state_dict `flatten_optimizer` took apart; also reads the demo build's first layout
    (tensors `<param>/<slot>`, scalars under `state`)."""
    state: dict[int, dict[str, Any]] = {}
    if "scalars" not in rest:  # the first demo layout
        state = {int(pid): dict(slots) for pid, slots in rest["state"].items()}
        for key, value in tensors.items():
            pid, slot = key.split("/", 1)
            state.setdefault(int(pid), {})[slot] = value
        return {"state": state, "param_groups": rest["param_groups"]}
    for key, value in tensors.items():
        _, pid, slot = key.split(".", 2)
        state.setdefault(int(pid), {})[slot] = value
    for key, value in rest["scalars"].items():
        pid, slot = key.split(".", 1)
        state.setdefault(int(pid), {})[slot] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def write_checkpoint(
    target: Path, weights: Mapping[str, torch.Tensor], optimizer: Mapping[str, Any] | None, meta: Mapping[str, Any], weights_file: str
) -> Path:
    """Write the folder `target` atomically: `weights_file`, the optimizer state_dict (none: no
    OPTIMIZER_FILE and `"optimizer": null`) and `meta` in STATE_FILE."""
    from safetensors.torch import save_file

    with atomic_folder(target) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / weights_file)
        rest = None
        if optimizer is not None:
            tensors, rest = flatten_optimizer(optimizer)
            save_file(tensors, tmp / OPTIMIZER_FILE)
        (tmp / STATE_FILE).write_text(json.dumps({**meta, "optimizer": rest}, indent=1))
    return target


def read_checkpoint(path: Path, weights_file: str) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, dict[str, Any]]:
    """(weights, the optimizer state_dict or None when none was saved, STATE_FILE) of a checkpoint folder."""
    from safetensors.torch import load_file

    meta = json.loads((path / STATE_FILE).read_text())
    weights = load_file(path / weights_file)
    optimizer = None
    if meta.get("optimizer") is not None:
        optimizer = unflatten_optimizer(load_file(path / OPTIMIZER_FILE), meta["optimizer"])
    return weights, optimizer, meta
