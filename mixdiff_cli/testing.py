"""Tiny real Stable Diffusion models built from configs, for tests, benchmarks and the demo.

Everything here is saved with ``save_pretrained`` / ``save_lora_weights`` and read back through the
same ``from_pretrained`` / ``load_lora_weights`` path a real checkpoint takes. Nothing is downloaded.
Heavy frameworks are imported inside the functions so that importing this module is free.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Literal

from mixdiff_cli.core.fsutil import atomic_folder
from mixdiff_cli.core.tokenizer import BOS, EOS, write_clip_tokenizer
from mixdiff_cli.models.pipeline import load_pipeline as _load_pipeline

LoraFormat = Literal["diffusers", "peft", "kohya"]

# A small general vocabulary, meant to be one token per word (see mixdiff_cli.core.tokenizer).
VOCAB: tuple[str, ...] = tuple(
    """
    a an the of in on at with and or by for to from over under near behind
    photo picture painting drawing sketch render illustration portrait landscape closeup poster
    anime cartoon watercolor oil pixel art style realistic photorealistic cinematic detailed vintage
    red orange yellow green blue purple pink brown black white gray grey gold silver colorful dark bright
    circle square triangle star heart stripes stripe dots pattern shape shapes background
    cat dog bird horse fish car house tree flower mountain river sea sky city street forest
    man woman person girl boy face robot castle dragon night day sunset snow rain
    small big tiny large old new beautiful cute happy
    high quality best low blurry ugly
    """.split()
)

# Component seeds are offset from the user's seed so that each part gets its own random init.
_SEED_UNET, _SEED_VAE, _SEED_TEXT, _SEED_TEXT2 = 0, 1000, 2000, 3000


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _vae(seed: int):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed + _SEED_VAE)  # callers hold torch.random.fork_rng()
    # two blocks -> vae_scale_factor 2: 32x32 latents decode to 64x64 images
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )


def _tokenizer(folder: Path, words: Iterable[str], pad: str = EOS):
    from transformers import CLIPTokenizer

    write_clip_tokenizer(folder, words)
    tok = CLIPTokenizer(
        vocab=str(folder / "vocab.json"),
        merges=str(folder / "merges.txt"),
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=pad,
        model_max_length=77,
    )
    tok.save_pretrained(folder)
    return tok


def _text_config(tok, hidden: int, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        projection_dim=projection_dim or hidden,
        hidden_act="quick_gelu",
    )


def _own_rng(fn):
    """Run ``fn`` (which seeds torch's global RNG) without changing the caller's random stream."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.random.fork_rng(devices=[]):
            return fn(*args, **kwargs)

    return wrapper


def _unet(seed: int, **layout):
    """The tiny UNet: latents (4, 32, 32) -> 64x64 images, two blocks; `layout` sets the blocks and conditioning."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed + _SEED_UNET)  # callers hold torch.random.fork_rng()
    return UNet2DConditionModel(sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                                attention_head_dim=(2, 4), norm_num_groups=32, **layout)


@_own_rng
def build_tiny_sd(folder: str | Path, seed: int = 0, words: Iterable[str] = VOCAB) -> Path:
    """Write a StableDiffusionPipeline folder (~1M-param UNet, 64x64 images) built from configs."""
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    with atomic_folder(folder) as tmp:
        tok = _tokenizer(tmp / "tokenizer", words)
        torch.manual_seed(seed + _SEED_TEXT)
        text_encoder = CLIPTextModel(_text_config(tok, hidden=32))
        unet = _unet(
            seed,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,  # = text_encoder hidden size
        )
        pipe = StableDiffusionPipeline(vae=_vae(seed), text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=_scheduler(),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(tmp, safe_serialization=True)
    return Path(folder)


@_own_rng
def build_tiny_sdxl(folder: str | Path, seed: int = 0, words: Iterable[str] = VOCAB) -> Path:
    """Write a StableDiffusionXLPipeline folder (two text encoders, text_time UNet) built from configs."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with atomic_folder(folder) as tmp:
        tok = _tokenizer(tmp / "tokenizer", words)
        tok2 = _tokenizer(tmp / "tokenizer_2", words, pad="!")  # SDXL's second tokenizer pads with "!"
        torch.manual_seed(seed + _SEED_TEXT)
        text_encoder = CLIPTextModel(_text_config(tok, hidden=32))
        torch.manual_seed(seed + _SEED_TEXT2)
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tok2, hidden=32, projection_dim=32))
        time_dim = 8
        unet = _unet(
            seed,
            # like SDXL: no attention in the first block, several transformer layers deeper
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
            cross_attention_dim=64,  # hidden(te1) + hidden(te2) = 32 + 32
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            # 6 time ids (original size, crop, target size) * time_dim + pooled te2 projection
            projection_class_embeddings_input_dim=6 * time_dim + 32,
        )
        pipe = StableDiffusionXLPipeline(vae=_vae(seed), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tok,
                                         tokenizer_2=tok2, unet=unet, scheduler=_scheduler(), force_zeros_for_empty_prompt=True,
                                         add_watermarker=False)
        pipe.save_pretrained(tmp, safe_serialization=True)
    return Path(folder)


def cached(root: str | Path, name: str, build: Callable[[Path], object]) -> Path:
    """``root/name``, first running ``build(folder)`` into a temporary folder renamed into place.

    A ``.complete`` marker and a file lock make parallel or killed runs see a whole fixture or none.
    """
    from filelock import FileLock

    root = Path(root)
    target = root / name
    if (target / ".complete").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{name}.lock")):
        if (target / ".complete").is_file():  # another process built it while we waited
            return target
        with atomic_folder(target) as tmp:  # replaces one left by a builder that died before its .complete
            build(tmp)
            (tmp / ".complete").touch()
    return target


def _is_sdxl(pipe_folder: Path) -> bool:
    index = json.loads((Path(pipe_folder) / "model_index.json").read_text())
    return "text_encoder_2" in index


def load_pipeline(pipe_folder: str | Path):
    """Load a tiny fixture with plain diffusers (float32, CPU, no progress bar)."""
    import torch

    return _load_pipeline(pipe_folder, torch.float32)


def _randomize_lora(model, generator, scale: float) -> None:
    """A ~ N(0, 1/in) like PEFT's kaiming init; B ~ N(0, scale^2), nonzero so the adapter acts."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[1] ** 0.5)
            elif ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=generator) * scale)


def _with_metadata(file: Path, metadata: Mapping[str, str] | None) -> Path:
    """Add string metadata to a safetensors file's header (rewrites the small file)."""
    if not metadata:
        return file
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(file, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = dict(f.metadata() or {})
    header.update({str(k): str(v) for k, v in metadata.items()})
    save_file(tensors, file, metadata=header)
    return file


def make_lora(
    pipe_folder: str | Path,
    out_path: str | Path,
    fmt: LoraFormat = "diffusers",
    rank: int = 4,
    seed: int = 0,
    scale: float = 0.01,
    text_encoder: bool = False,
    targets: Iterable[str] = ("to_q", "to_k", "to_v", "to_out.0"),
    alpha: float | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a random LoRA for the UNet (and text encoders) of ``pipe_folder`` in one on-disk format.

    diffusers: one ``.safetensors`` with ``unet.``/``text_encoder.`` keys (``save_lora_weights``);
    peft: a folder with ``adapter_model.safetensors`` + ``adapter_config.json`` (returns the folder);
    kohya: one ``.safetensors`` with ``lora_unet_*.lora_down/lora_up/alpha`` keys.
    ``alpha`` defaults to ``rank`` (scale 1). ``metadata`` goes into the safetensors header.
    """
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    if fmt not in ("diffusers", "peft", "kohya"):
        raise ValueError(f"unknown LoRA format {fmt!r}; expected diffusers, peft or kohya")
    if fmt == "peft" and text_encoder:
        raise ValueError("the peft format holds one model's adapter; use text_encoder=False")
    pipe_folder, out_path = Path(pipe_folder), Path(out_path)
    sdxl = _is_sdxl(pipe_folder)
    alpha = float(rank if alpha is None else alpha)
    gen = torch.Generator().manual_seed(seed)

    unet = UNet2DConditionModel.from_pretrained(pipe_folder / "unet", local_files_only=True)
    unet_config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)
    unet.add_adapter(unet_config)
    _randomize_lora(unet, gen, scale)
    parts = {"unet": (get_peft_model_state_dict(unet), unet_config)}
    if text_encoder:
        from peft import inject_adapter_in_model
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        te_config = LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"], init_lora_weights=True
        )
        te_parts = [("text_encoder", CLIPTextModel)] + ([("text_encoder_2", CLIPTextModelWithProjection)] if sdxl else [])
        for name, cls in te_parts:
            te = cls.from_pretrained(pipe_folder / name, local_files_only=True)
            # transformers' own add_adapter wants peft>=0.22; PEFT's injection works on any module
            te = inject_adapter_in_model(te_config, te)
            _randomize_lora(te, gen, scale)
            parts[name] = (get_peft_model_state_dict(te), te_config)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "diffusers":
        pipe_cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
        kwargs = {}
        for name, (sd, cfg) in parts.items():
            kwargs[f"{name}_lora_layers"] = sd
            kwargs[f"{name}_lora_adapter_metadata"] = cfg.to_dict()
        pipe_cls.save_lora_weights(out_path.parent, weight_name=out_path.name, **kwargs)
        return _with_metadata(out_path, metadata)
    if fmt == "peft":
        out_path.mkdir(parents=True, exist_ok=True)
        sd, cfg = parts["unet"]
        cfg.save_pretrained(out_path)
        # PeftModel.save_pretrained keys: base_model.model.<module>.lora_A.weight
        sd = {f"base_model.model.{k}": v for k, v in sd.items()}
        save_file(sd, out_path / "adapter_model.safetensors", metadata={"format": "pt", **dict(metadata or {})})
        return out_path
    else:  # kohya
        peft_sd = {f"{name}.{k}": v for name, (sd, _) in parts.items() for k, v in sd.items()}
        kohya = convert_state_dict_to_kohya(peft_sd)
        # convert_state_dict_to_kohya writes alpha = rank; write the real alpha (kohya scale = alpha / rank)
        kohya = {k: (torch.tensor(alpha) if k.endswith(".alpha") else v.contiguous()) for k, v in kohya.items()}
        if not sdxl:  # SD 1.x kohya files name the single text encoder lora_te_, not lora_te1_
            kohya = {k.replace("lora_te1_", "lora_te_", 1): v for k, v in kohya.items()}
        save_file(kohya, out_path, metadata={"format": "pt", **dict(metadata or {})})
        return out_path


@_own_rng
def make_full_model(
    pipe_folder: str | Path, out_folder: str | Path, seed: int = 1, single_file: str | Path | None = None
) -> Path:
    """Save a second UNet (same config, weights from ``seed``) as a diffusers model folder.

    With ``single_file``, also write it as an original-layout checkpoint (``model.diffusion_model.*``
    keys, UNet only), loadable with ``UNet2DConditionModel.from_single_file(path, config=pipe_folder,
    subfolder="unet")``.
    """
    import torch
    from diffusers import UNet2DConditionModel

    pipe_folder = Path(pipe_folder)
    config = UNet2DConditionModel.load_config(pipe_folder / "unet")
    torch.manual_seed(seed + _SEED_UNET)
    unet = UNet2DConditionModel.from_config(config)
    with atomic_folder(out_folder) as tmp:
        unet.save_pretrained(tmp, safe_serialization=True)
    if single_file is not None:
        from safetensors.torch import save_file

        from mixdiff_cli.catalog.formats import diffusers_to_sgm

        cfg = dict(unet.config)
        state = {f"model.diffusion_model.{diffusers_to_sgm(k, cfg)}": v.contiguous() for k, v in unet.state_dict().items()}
        Path(single_file).parent.mkdir(parents=True, exist_ok=True)
        save_file(state, Path(single_file), metadata={"format": "pt"})
    return Path(out_folder)


def build_tiny_catalog(folder: str | Path, seed: int = 0) -> Path:
    """A ready catalog over the tiny SD model with three LoRA experts (the stand-in default before the
    demo model exists, and a playground). Built through the public catalog API; idempotent."""
    from mixdiff_cli.core.quiet import quiet_frameworks

    folder = Path(folder)
    catalog = folder / "experts.yaml"
    if catalog.is_file():
        return catalog
    with quiet_frameworks():
        return _build_tiny_catalog(folder, catalog, seed)


def _build_tiny_catalog(folder: Path, catalog: Path, seed: int) -> Path:
    from mixdiff_cli.experts.manage import add_expert, init_catalog

    base = build_tiny_sd(folder / "base", seed=seed) if not (folder / "base" / "model_index.json").is_file() else folder / "base"
    experts = {
        "shapes": (["a red circle on a blue background", "a green square", "a yellow triangle shape"], ["shape"]),
        "watercolor": (["a watercolor painting of a river", "soft watercolor sky at sunset"], ["watercolor"]),
        "pixel": (["pixel art castle", "a pixel art robot in a city"], ["pixel"]),
    }
    for i, name in enumerate(experts):
        make_lora(base, folder / "experts" / f"{name}.safetensors", "diffusers", seed=seed + i + 1, scale=0.05)
    tmp = folder / ".experts.yaml.building"
    tmp.unlink(missing_ok=True)
    init_catalog(tmp, base=str(base))
    for name, (prompts, trigger) in experts.items():
        add_expert(tmp, str(folder / "experts" / f"{name}.safetensors"), name=name, prompts=prompts, trigger=trigger,
                   description=f"tiny random {name} LoRA (a stand-in, not trained)")
    tmp.rename(catalog)
    return catalog
