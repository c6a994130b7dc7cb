"""One switch for framework chatter: diffusers/transformers loading bars, torchvision notices and
PEFT's "multiple adapters" warning are off while mixdiff works (MIXDIFF_DEBUG=1 keeps them)."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_frameworks() -> Iterator[None]:
    """Silence diffusers/transformers/peft while the block runs; restore their settings after."""
    if os.environ.get("MIXDIFF_DEBUG", "") not in ("", "0", "false"):
        yield
        return
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    bars = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    levels = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Already found a `peft_config`", category=UserWarning)
            yield
    finally:
        dlog.set_verbosity(levels[0])
        tlog.set_verbosity(levels[1])
        if bars[0]:
            dlog.enable_progress_bar()
        if bars[1]:
            tlog.enable_progress_bar()
