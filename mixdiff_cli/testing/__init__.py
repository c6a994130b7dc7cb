"""Tiny real models built from configs, for tests, benchmarks and the demo: the pipelines each family builds
(`pipelines`), LoRAs and second models (`loras`), the compatibility corpus in each public tool's key layout
(`corpus`), header-only files of real geometry (`real`) and a ready tiny catalog (`catalog`).

Everything is saved with `save_pretrained` / `save_lora_weights` and read back through the same
`from_pretrained` / `load_lora_weights` path a real checkpoint takes. Nothing is downloaded. Heavy frameworks
are imported inside the functions, so importing this package is free.
"""

from mixdiff_cli.testing.catalog import build_tiny_catalog
from mixdiff_cli.testing.corpus import (
                                           LAYOUTS,
                                           LOCON,
                                           REFUSED,
                                           make_full_layout,
                                           make_layout,
                                           make_refused,
)
from mixdiff_cli.testing.loras import (
                                           ATTN,
                                           TEXT_ATTN,
                                           LoraFormat,
                                           LoraSpec,
                                           make_full_model,
                                           make_lora,
)
from mixdiff_cli.testing.pipelines import (
                                           VOCAB,
                                           build_tiny,
                                           build_tiny_sd,
                                           build_tiny_sdxl,
                                           cached,
                                           load_component,
                                           load_pipeline,
                                           set_prediction_type,
)
from mixdiff_cli.testing.real import (
                                           real_state,
                                           write_header_only,
                                           write_real_checkpoint,
                                           write_real_lora,
)

__all__ = [
    "ATTN", "LAYOUTS", "LOCON", "REFUSED", "TEXT_ATTN", "VOCAB", "LoraFormat", "LoraSpec", "build_tiny", "build_tiny_catalog",
    "build_tiny_sd", "build_tiny_sdxl", "cached", "load_component", "load_pipeline", "make_full_layout", "make_full_model",
    "make_layout", "make_lora", "make_refused", "real_state", "set_prediction_type", "write_header_only", "write_real_checkpoint",
    "write_real_lora",
]  # fmt: skip

