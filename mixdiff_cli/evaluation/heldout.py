"""`HeldoutLoss`: the held-out denoising loss of any blend of experts on one set of captioned images."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


class HeldoutLoss:
    """The held-out denoising loss of any blend of experts on one set of captioned images.

    The (image, noise, timestep) triples are fine-tune's validation set, built the same way and from the
    same fixed seed, so the numbers are the same run to run and comparable with fine-tune's report.
    `rows[i]` is the record that triple i comes from (records repeat when `evals` > len(records)).
    """

    def __init__(self, engine: Any, records: Sequence[Any], evals: int):
        from diffusers import DDPMScheduler

        from mixdiff_cli.training.encoding import CaptionEncoder
        from mixdiff_cli.training.loss import make_heldout

        self.engine = engine
        self.text = CaptionEncoder(engine.pipe, engine.family)
        self.scheduler = DDPMScheduler.from_config(engine.pipe.scheduler.config)
        self.resolution = engine.native_size()
        # token ids kept: the text is encoded per model (LoRAs on the encoder)
        self.val = make_heldout(engine.pipe, self.text, records, self.resolution, engine.device, self.scheduler.config.num_train_timesteps,
                                evals=evals)
        self.rows: list[int] = self.val.rows.tolist()

    def __len__(self) -> int:
        return len(self.rows)

    def losses(self, experts: Sequence[str] = (), batch_size: int = 16) -> list[float]:
        """Per-triple MSE with `experts` (equal weights; none: the bare base) active through the mixture
        module. Summed by callers in float64 in a fixed order, so the batch size changes nothing but
        float32 rounding."""
        from mixdiff_cli.sampling.engine import Active
        from mixdiff_cli.training.loss import heldout_losses

        engine = self.engine
        members = [Active(engine.catalog.expert(n), 1.0) for n in experts]
        with engine.routed(members) as mixture:
            chunks = heldout_losses(mixture, self.scheduler, self.text, self.val, chunk=batch_size, dtype=engine.denoiser.dtype)
        return [x for losses in chunks for x in losses.double().cpu().tolist()]

    def loss(self, experts: Sequence[str] = (), batch_size: int = 16) -> float:
        """Mean of `losses`, summed in float64."""
        per = self.losses(experts, batch_size)
        return math.fsum(per) / len(per)
