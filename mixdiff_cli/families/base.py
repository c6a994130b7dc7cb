"""The family interface: everything mixdiff asks of a model family (SD 1.x, SD 2.x, SDXL, ...), answered
in one module per family. The engine, canvas, training and catalog ask a `Family`; they never name a
model class.

A family's denoiser is called through one thin wrapper (k-diffusion's `external.py` in spirit):
`split` turns the pipeline's call of its denoiser into (x, t, cond, rest), where `cond` is a flat dict of
batch-first tensors (the conditioning; opaque to the mixture), `run` calls a denoiser on (x, t, cond) and
returns its prediction (B, C, H, W), `output` wraps a prediction the way the pipeline expects it back.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

Cond = dict[str, "torch.Tensor"]  # conditioning of a denoiser call, every tensor batch-first (B, ...)


class Family:
    """One model family. Subclasses set the attributes and override what differs."""

    name: str = ""  # the catalog's `arch` value
    label: str = ""  # how users read it: "SD 1.x"
    pipelines: tuple[str, ...] = ()  # diffusers text-to-image pipeline classes (model_index.json `_class_name`)
    denoiser: str = "unet"  # the pipeline attribute holding the denoiser
    text_encoders: tuple[str, ...] = ("text_encoder",)  # pipeline attributes holding the text encoders
    tokenizers: tuple[str, ...] = ("tokenizer",)  # and their tokenizers
    schedulers: tuple[str, ...] = ("ddim", "euler", "euler-a", "dpm++")  # mixdiff scheduler names that apply
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")  # what fine-tune trains by default
    public: dict[str, dict[str, dict]] = {}  # public checkpoint -> its configs by component ("unet", "text_encoder", "scheduler")
    modelspec_architecture: str = ""  # SAI model spec `modelspec.architecture` of this family's LoRAs
    kohya_base_version: str = ""  # kohya `ss_base_model_version`
    checkpoint_prefix: str = ""  # the denoiser's key prefix in an original single-file checkpoint
    checkpoint_prefixes: tuple[str, ...] = ()  # key prefixes that mark an original single-file checkpoint
    kohya_prefixes: tuple[tuple[str, str], ...] = ()  # kohya LoRA key prefix -> pipeline component
    modelspec_prefix: str = "\0"  # how LoRA metadata names the family: SAI `modelspec.architecture` prefix,
    kohya_prefix: str = "\0"  # kohya `ss_base_model_version` prefix

    # --- detection ------------------------------------------------------------------------------------

    def matches(self, pipeline: str, denoiser_config: Mapping[str, Any]) -> bool:
        """Whether a pipeline of class `pipeline` whose denoiser has `denoiser_config` is of this family."""
        return pipeline in self.pipelines

    def claims_config(self, denoiser_config: Mapping[str, Any]) -> bool:
        """Whether a denoiser with this config (no pipeline around it) is of this family."""
        return False

    def is_denoiser_config(self, config: Mapping[str, Any]) -> bool:
        """Whether `config` is a config of this family's denoiser class."""
        return False

    def from_metadata(self, meta: Mapping[str, str], sidecar: Mapping[str, Any]) -> bool:
        """Whether a file's metadata (safetensors header, A1111 sidecar) names this family."""
        spec = (meta.get("modelspec.architecture") or "").lower()
        version = (meta.get("ss_base_model_version") or "").lower()
        return spec.startswith(self.modelspec_prefix) or version.startswith(self.kohya_prefix) or str(sidecar.get("sd version") or "").lower() == self.name

    def lora_evidence(self, modules: Sequence[Any], meta: Mapping[str, str], sidecar: Mapping[str, Any]) -> int | None:
        """How strongly a LoRA's modules (component, path, in/out features) say it is of this family: 0 its
        keys, 1 its shapes, 2 its metadata, 3 weaker shapes; None: no sign."""
        return 2 if self.from_metadata(meta, sidecar) else None

    def checkpoint_evidence(self, header: Mapping[str, dict], meta: Mapping[str, str]) -> int | None:
        """The same for a whole single-file checkpoint's header."""
        return 2 if self.from_metadata(meta, {}) else None

    def model_fit(self, theirs: Mapping[str, Any] | None, shapes: Mapping[str, tuple[int, int]], mine: Mapping[str, Any]) -> str | None:
        """Why a whole-model expert (its denoiser config, else its module shapes) cannot stand in for the base's."""
        return self.denoiser_mismatch(mine, theirs) if theirs is not None else self.denoiser_fit(shapes, mine, "model")

    def denoiser_fit(self, shapes: Mapping[str, tuple[int, int]], config: Mapping[str, Any], noun: str) -> str | None:
        """Why modules of these (in, out) shapes do not all exist in a denoiser with `config`, or None."""
        return None

    # --- sizes ----------------------------------------------------------------------------------------

    def native_size(self, denoiser_config: Mapping[str, Any], vae_scale: int) -> int:
        """The side in pixels the base was trained at."""
        size = denoiser_config.get("sample_size", 64)
        return int(size[0] if isinstance(size, (list, tuple)) else size) * vae_scale

    def size_multiple(self, denoiser_config: Mapping[str, Any], vae_scale: int) -> int:
        """Image sides must be multiples of this many pixels."""
        return vae_scale * 2 ** (len(denoiser_config.get("block_out_channels", [0])) - 1)

    # --- loading --------------------------------------------------------------------------------------

    def load(self, path: Path, **kwargs: Any) -> Any:
        """The text-to-image pipeline in the diffusers folder `path`."""
        from diffusers import (
            AutoPipelineForText2Image,  # its import alone warns about torchvision
        )

        return AutoPipelineForText2Image.from_pretrained(path, local_files_only=True, use_safetensors=True, **kwargs)

    def assemble(self, **components: Any) -> Any:
        """The text-to-image pipeline made of `components` (its `from_pretrained` keyword names)."""
        import diffusers

        return getattr(diffusers, self.pipelines[0])(**components)

    def load_single_file(self, path: Path, dtype: Any) -> Any:
        """The pipeline of a single-file checkpoint."""
        raise NotImplementedError(f"{self.label} bases cannot load from one file")

    def load_denoiser(self, path: Path, like: Any, dtype: Any) -> Any:
        """A whole-model expert's denoiser (a folder or one .safetensors file), shaped like the base's `like`."""
        raise NotImplementedError(f"{self.label} has no whole-model experts")

    def denoiser_mismatch(self, mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> str | None:
        """What keeps a model expert's denoiser (config `theirs`) from blending with the base's (`mine`)."""
        return None

    # --- text -----------------------------------------------------------------------------------------

    def encoders(self, pipe: Any) -> list[Any]:
        """The pipeline's text encoders that are present."""
        return [te for te in (getattr(pipe, name, None) for name in self.text_encoders) if te is not None]

    def encode(self, pipe: Any, texts: list[str], device: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """({pipeline kwarg: (N, ...)} of the cond half, (N, D) router vector) for `texts`, in one pass."""
        raise NotImplementedError

    def zero_negative(self, pipe: Any) -> bool:
        """Whether a missing negative prompt is zeros (else the encoding of "")."""
        return False

    def denoiser_cond(self, fields: Mapping[str, torch.Tensor]) -> Cond:
        """The denoiser conditioning for encoded fields (pipeline kwarg names -> denoiser input names)."""
        raise NotImplementedError

    def decode(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        """The pipeline's own decode step: latents (B, C, h, w) -> images (B, 3, H, W) in [-1, 1]."""
        raise NotImplementedError(f"no latent decoder for {self.label}")

    def tile_cond(self, box: tuple[int, int, int, int], canvas: tuple[int, int], like: torch.Tensor) -> Cond:
        """Extra conditioning of a tile (y0, x0, h, w) px of a (height, width) px canvas (dtype/device of `like`)."""
        return {}

    def uses_cfg(self, denoiser_config: Mapping[str, Any], guidance: float) -> bool:
        """Whether the pipeline runs classifier-free guidance (two halves per image) at `guidance`."""
        return guidance > 1

    # --- training ---------------------------------------------------------------------------------------

    def caption_modules(self, pipe: Any) -> tuple[list[Any], list[Any]]:
        """(tokenizers, text encoders) that fine-tune encodes captions with."""
        return [getattr(pipe, name) for name in self.tokenizers], [getattr(pipe, name) for name in self.text_encoders]

    def caption_encode(self, encoders: Sequence[Any], ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids per tokenizer -> (hidden (B, T, D), pooled (B, P) or None), as diffusers' training scripts do."""
        raise NotImplementedError

    def micro_cond(self, size: tuple[int, int], top: int, left: int, resolution: int) -> list[float] | None:
        """Per-image micro-conditioning of a `resolution` crop at (top, left) of an image of original `size`
        (h, w); None where the family has none."""
        return None

    def train_cond(self, hidden: torch.Tensor, pooled: torch.Tensor | None, micro: torch.Tensor | None) -> Cond:
        """The denoiser conditioning of a training batch."""
        return {"encoder_hidden_states": hidden}

    def lora_writer(self) -> Any:
        """The diffusers pipeline class whose `save_lora_weights` writes this family's LoRA files."""
        raise NotImplementedError(f"fine-tune does not train {self.label} LoRAs")

    # --- the denoiser wrapper -------------------------------------------------------------------------

    def split(self, args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, Any, Cond, dict[str, Any]]:
        """The pipeline's call of its denoiser -> (x, t, cond, rest)."""
        raise NotImplementedError

    def run(self, model: Any, x: torch.Tensor, t: Any, cond: Cond, rest: Mapping[str, Any]) -> torch.Tensor:
        """`model`'s prediction (B, C, H, W) on (x, t, cond)."""
        raise NotImplementedError

    def output(self, prediction: torch.Tensor, return_dict: bool) -> Any:
        """`prediction` as the pipeline expects its denoiser's output."""
        raise NotImplementedError

    # --- LoRA files -----------------------------------------------------------------------------------

    def lora_prefixes(self) -> list[str]:
        """The components a diffusers LoRA file names (`unet.`, `text_encoder.`, ...)."""
        return [self.denoiser, *self.text_encoders]

    def kohya_stem(self, component: str, module: str, denoiser_config: Mapping[str, Any], original: bool = True) -> str:
        """The kohya key stem of `component`'s `module` (diffusers name): `<prefix><module with _>`. `original`:
        the denoiser's module named as sd-scripts' own model names it (diffusers' `convert_state_dict_to_kohya`
        keeps diffusers names)."""
        prefix = next((p for p, c in self.kohya_prefixes if c == component), None)
        if prefix is None:
            raise ValueError(f"{self.label} kohya LoRAs have no {component}")
        return prefix + module.replace(".", "_")

    def checkpoint_state(self, denoiser: Mapping[str, Any], config: Mapping[str, Any], texts: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """diffusers state dicts (the denoiser's, the text encoders' by component) as this family's original
        single-file checkpoint keys: the inverse of `load_single_file`."""
        raise NotImplementedError(f"no single-file layout for {self.label}")

    # --- tests ----------------------------------------------------------------------------------------

    def build_tiny(self, folder: Path, seed: int, words: Iterable[str]) -> None:
        """Write a tiny real pipeline of this family into `folder` (built from configs, random weights)."""
        raise NotImplementedError(f"no tiny {self.label} pipeline")

    def __repr__(self) -> str:
        return f"<family {self.name}>"


def read_folder(path: Path, denoiser: str = "unet") -> tuple[str, dict[str, Any]]:
    """(pipeline class, denoiser config) of a diffusers folder, from its JSON files only."""
    cls = json.loads((path / "model_index.json").read_text())["_class_name"]
    config_file = path / denoiser / "config.json"
    return cls, (json.loads(config_file.read_text()) if config_file.is_file() else {})


def take(cond: Mapping[str, Any], rows: Sequence[int]) -> Cond:
    """Rows `rows` of every tensor in `cond`."""
    import torch

    out = {}
    for key, value in cond.items():
        idx = torch.as_tensor(list(rows), dtype=torch.long, device=value.device)
        out[key] = value.index_select(0, idx)
    return out


def cat(conds: Sequence[Mapping[str, torch.Tensor]]) -> Cond:
    """Conditionings stacked along the batch (every one with the same keys)."""
    import torch

    return {key: torch.cat([c[key] for c in conds]) for key in conds[0]}


def repeat(cond: Mapping[str, torch.Tensor], m: int) -> Cond:
    """Each tensor's batch repeated `m` times: (B, ...) -> (m*B, ...)."""
    if m == 1:
        return dict(cond)
    return {key: v.repeat(m, *([1] * (v.ndim - 1))) for key, v in cond.items()}
