"""A batch split between processes under `torchrun` / `accelerate launch`: the state, each process's
share of the work, the shared base seed and the summed counts."""

from __future__ import annotations

import os
import random
from typing import TYPE_CHECKING, Any

from mixdiff_cli.sampling.options import MAX_SEED

if TYPE_CHECKING:
    from mixdiff_cli.sampling.work import Work


def distributed_state(device: str | None) -> Any:
    """accelerate's PartialState when launched with several processes (torchrun / accelerate launch)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    from mixdiff_cli.core.runtime import pick_device

    return PartialState(cpu=pick_device(device).type == "cpu")  # a plain PartialState() under torchrun on CPU reports one process


def split_work(todo: list[Work], state: Any) -> list[Work]:
    """This process's share: the work ordered by route group, cut in contiguous equal spans, so each
    process activates only the few expert sets its span crosses."""
    if state is None or state.num_processes == 1:
        return todo
    with state.split_between_processes(todo) as mine:
        return list(mine)


def base_seed(seed: int | None, done: dict[str, dict[str, Any]], state: Any) -> int:
    """The run's seed: given, else the one a resumed manifest recorded, else drawn (rank 0's draw)."""
    if seed is not None:
        return seed
    recorded = next((r["base_seed"] for r in done.values() if isinstance(r.get("base_seed"), int)), None)
    if recorded is not None:
        return recorded
    seed = random.randint(0, MAX_SEED)
    if state is not None:
        from accelerate.utils import broadcast_object_list

        seed = broadcast_object_list([seed])[0]
    return seed


def gather(state: Any, result: Any, n_parse_errors: int) -> None:
    """Every process's counts and errors, summed into `result` (a batch.BatchResult, on every process)."""
    from accelerate.utils import gather_object

    state.wait_for_everyone()
    mine = (result.written, result.failed - n_parse_errors, result.errors[n_parse_errors:])
    counts = gather_object([mine])
    result.written = sum(c[0] for c in counts)
    result.failed = n_parse_errors + sum(c[1] for c in counts)
    result.errors = result.errors[:n_parse_errors] + [e for c in counts for e in c[2]]
