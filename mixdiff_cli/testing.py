"""Tiny real Stable Diffusion models built from configs, for tests, benchmarks and the demo.

Everything here is saved with ``save_pretrained`` / ``save_lora_weights`` and read back through the
same ``from_pretrained`` / ``load_lora_weights`` path a real checkpoint takes. Nothing is downloaded.
Heavy frameworks are imported inside the functions so that importing this module is free.
"""

from __future__ import annotations

import functools
import json
import re
import struct
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

        from mixdiff_cli.families.unet_geometry import diffusers_to_sgm

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


# ---------------------------------------------------------------------------------------------
# the compatibility corpus: files in each tool's exact key layout (tests/test_compat.py)

ATTN = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")
# kohya LoCon: Linear and 1x1 convs of the transformers plus the ResNet / resampler convs (conv_dim)
LOCON = ATTN + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut", "time_emb_proj",
                "downsamplers.0.conv", "upsamplers.0.conv")  # fmt: skip
# the LoRA layouts make_layout writes (see its docstring), and the refused adapter kinds
LAYOUTS = ("diffusers-peft", "diffusers-noalpha", "diffusers-script", "diffusers-alphas", "attn-procs", "kohya", "kohya-locon",
           "kohya-fp16", "kohya-bf16", "kohya-te", "peft", "peft-modules-to-save")  # fmt: skip
REFUSED = ("loha", "lokr", "ia3", "kohya-dora", "peft-dora", "peft-loha", "peft-ia3")


def _unet_lora(pipe_folder: Path, targets: Iterable[str], rank: int, alpha: float, gen, scale: float) -> dict:
    """A random PEFT LoRA on the fixture's UNet: ``get_peft_model_state_dict`` keys (``<module>.lora_A.weight``)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(pipe_folder / "unet", local_files_only=True)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True))
    _randomize_lora(unet, gen, scale)
    return get_peft_model_state_dict(unet)


def _text_loras(pipe_folder: Path, rank: int, alpha: float, gen, scale: float) -> dict[str, dict]:
    """Random PEFT LoRAs on the text encoder(s), keyed as transformers 4 (and every published file) names
    them: ``text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight``."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    parts = {}
    for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        if not (pipe_folder / name).is_dir():
            continue
        te = cls.from_pretrained(pipe_folder / name, local_files_only=True)
        te = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(TEXT_ATTN)), te)
        _randomize_lora(te, gen, scale)
        parts[name] = {("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in get_peft_model_state_dict(te).items()}
    return parts


def _kohya(parts: dict[str, dict], sdxl: bool, unet_config: dict, alpha: float, dtype) -> dict:
    """PEFT parts in kohya sd-scripts' layout: ``lora_unet_<module>`` with SGM block names for SDXL (its own
    UNet) and diffusers names for SD 1.x/2.x, ``lora_te_`` (SD) / ``lora_te1_``, ``lora_te2_`` (SDXL),
    ``.lora_down`` / ``.lora_up`` and a ``.alpha`` scalar per module, all saved in ``dtype``."""
    import torch

    from mixdiff_cli.families.unet_geometry import diffusers_to_sgm

    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}
    out = {}
    for component, state in parts.items():
        for key, value in state.items():
            module, _, matrix = key.rpartition(".lora_")
            if component == "unet" and sdxl:
                module = diffusers_to_sgm(module, unet_config)
            name = prefix[component] + module.replace(".", "_")
            out[f"{name}.lora_{'down' if matrix.startswith('A') else 'up'}.weight"] = value.to(dtype).contiguous()
            out[f"{name}.alpha"] = torch.tensor(alpha).to(dtype)
    return out


@_own_rng
def make_layout(pipe_folder: str | Path, out_path: str | Path, layout: str, seed: int = 0, rank: int = 4,
                alpha: float | None = None, scale: float = 0.05) -> Path:
    """Write a random LoRA for ``pipe_folder`` in one tool's exact key layout (``LAYOUTS``); returns the file
    (the folder for PEFT).

    diffusers-peft: ``save_lora_weights`` of PEFT keys with ``lora_adapter_metadata`` (alpha);
    diffusers-noalpha: the same without metadata (scale 1);
    diffusers-script: the training scripts' ``convert_state_dict_to_diffusers(get_peft_model_state_dict(m))``
    (``unet.….lora.down.weight``, ``text_encoder….lora_linear_layer.down.weight``), text encoders included;
    diffusers-alphas: script keys plus ``unet.<module>.alpha`` network alphas;
    attn-procs: ``unet.save_attn_procs`` of diffusers < 0.19 (``….attn1.processor.to_q_lora.down.weight``);
    kohya / kohya-fp16 / kohya-bf16: sd-scripts names with ``.alpha``, UNet and text encoders, in that dtype;
    kohya-locon: conv layers too (LoCon); kohya-te: text encoders only;
    peft / peft-modules-to-save: ``get_peft_model(unet, config).save_pretrained`` (the latter saving conv_out whole).
    """
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors.torch import save_file

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    pipe_folder, out_path = Path(pipe_folder), Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sdxl = _is_sdxl(pipe_folder)
    alpha = float(rank if alpha is None else alpha)
    gen = torch.Generator().manual_seed(seed)
    if layout.startswith("peft"):
        return _peft_folder(pipe_folder, out_path, rank, alpha, gen, scale, saved=("conv_out",) if layout.endswith("save") else ())
    targets = LOCON if layout == "kohya-locon" else ATTN
    parts = {} if layout == "kohya-te" else {"unet": _unet_lora(pipe_folder, targets, rank, alpha, gen, scale)}
    if layout in ("diffusers-script", "diffusers-alphas", "kohya", "kohya-fp16", "kohya-bf16", "kohya-te"):
        parts |= _text_loras(pipe_folder, rank, alpha, gen, scale)
    if layout.startswith("kohya"):
        dtype = {"kohya-fp16": torch.float16, "kohya-bf16": torch.bfloat16}.get(layout, torch.float32)
        unet_config = dict(UNet2DConditionModel.load_config(pipe_folder / "unet"))
        save_file(_kohya(parts, sdxl, unet_config, alpha, dtype), out_path, metadata={"ss_network_dim": str(rank), "ss_network_alpha": f"{alpha:g}"})
        return out_path
    if layout == "attn-procs":
        old = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
        state = {}
        for key, value in parts["unet"].items():
            module, _, matrix = key.rpartition(".lora_")
            block, _, proj = module.rpartition(".attn")  # …transformer_blocks.0 / 1.to_q
            number, _, name = proj.partition(".")
            state[f"{block}.attn{number}.processor.{old[name]}.{'down' if matrix.startswith('A') else 'up'}.weight"] = value.contiguous()
        save_file(state, out_path)
        return out_path
    kwargs = {}
    for name, state in parts.items():
        kwargs[f"{name}_lora_layers"] = state if layout in ("diffusers-peft", "diffusers-noalpha") else convert_state_dict_to_diffusers(state)
    if layout == "diffusers-peft":
        from peft import LoraConfig

        kwargs["unet_lora_adapter_metadata"] = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets)).to_dict()
    pipe_cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    pipe_cls.save_lora_weights(out_path.parent, weight_name=out_path.name, **kwargs)
    if layout == "diffusers-alphas":  # network alphas, one scalar per module, beside the script's keys
        from safetensors.torch import load_file

        state = load_file(out_path)
        modules = {re.sub(r"\.(lora|lora_linear_layer)\.(down|up)\.weight$|\.lora_[AB]\.weight$", "", k) for k in state}
        save_file({**state, **{f"{m}.alpha": torch.tensor(alpha) for m in modules}}, out_path)
    return out_path


def _peft_folder(pipe_folder: Path, folder: Path, rank: int, alpha: float, gen, scale: float, saved: tuple[str, ...] = ()) -> Path:
    """``get_peft_model(unet, LoraConfig(...)).save_pretrained(folder)``, PEFT's own adapter folder; modules in
    ``saved`` are kept whole (``modules_to_save``) and perturbed so that they matter."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model

    unet = UNet2DConditionModel.from_pretrained(pipe_folder / "unet", local_files_only=True)
    model = get_peft_model(unet, LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(ATTN), modules_to_save=list(saved) or None))
    _randomize_lora(model, gen, scale)
    with torch.no_grad():
        for name in saved:
            copy = model.base_model.model.get_submodule(name).modules_to_save["default"]
            for p in copy.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(folder)
    return folder


@_own_rng
def make_refused(pipe_folder: str | Path, out_path: str | Path, kind: str, rank: int = 4) -> Path:
    """An adapter mixdiff refuses by name (``REFUSED``): LyCORIS LoHa / LoKr / (IA)^3 in kohya naming, kohya
    DoRA (``dora_scale``), and PEFT's own DoRA / LoHa / (IA)^3 folders."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    pipe_folder, out_path = Path(pipe_folder), Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if kind.startswith("peft-"):
        from peft import IA3Config, LoHaConfig, LoraConfig, get_peft_model

        config = {"peft-dora": LoraConfig(r=rank, lora_alpha=rank, target_modules=list(ATTN), use_dora=True),
                  "peft-loha": LoHaConfig(r=rank, alpha=rank, target_modules=list(ATTN)),
                  "peft-ia3": IA3Config(target_modules=["to_k", "to_v", "ff.net.2"], feedforward_modules=["ff.net.2"])}[kind]  # fmt: skip
        unet = UNet2DConditionModel.from_pretrained(pipe_folder / "unet", local_files_only=True)
        get_peft_model(unet, config).save_pretrained(out_path)
        return out_path
    unet = UNet2DConditionModel.from_pretrained(pipe_folder / "unet", local_files_only=True)
    state = {}
    for module, layer in unet.named_modules():
        if not module.endswith(ATTN):
            continue
        name = "lora_unet_" + module.replace(".", "_")
        fout, fin = layer.weight.shape
        if kind == "loha":  # LyCORIS LoHa: dW = (w1_a w1_b) * (w2_a w2_b), scaled alpha / r
            state |= {f"{name}.hada_w1_a": torch.randn(fout, rank), f"{name}.hada_w1_b": torch.randn(rank, fin),
                      f"{name}.hada_w2_a": torch.randn(fout, rank), f"{name}.hada_w2_b": torch.randn(rank, fin)}  # fmt: skip
        elif kind == "lokr":  # LyCORIS LoKr: dW = kron(w1, w2_a w2_b)
            state |= {f"{name}.lokr_w1": torch.randn(2, 2), f"{name}.lokr_w2_a": torch.randn(fout // 2, rank),
                      f"{name}.lokr_w2_b": torch.randn(rank, fin // 2)}  # fmt: skip
        elif kind == "ia3":  # LyCORIS (IA)^3: a learned scale per output feature
            state |= {f"{name}.weight": torch.randn(fout), f"{name}.on_input": torch.tensor(False)}
        elif kind == "kohya-dora":  # kohya / LyCORIS DoRA: a LoRA plus a magnitude per output feature
            state |= {f"{name}.lora_down.weight": torch.randn(rank, fin), f"{name}.lora_up.weight": torch.randn(fout, rank),
                      f"{name}.dora_scale": torch.randn(fout, 1)}  # fmt: skip
        else:
            raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(REFUSED)}")
        if kind != "ia3":
            state[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file({k: v.contiguous() for k, v in state.items()}, out_path)
    return out_path


def _openclip_text(prefix: str, state: Mapping) -> dict:
    """A transformers CLIP text encoder's weights under OpenCLIP's names (SD 2.x ``cond_stage_model.model.``,
    SDXL ``conditioner.embedders.1.model.``): q/k/v packed into ``attn.in_proj_weight``."""
    import torch

    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {}
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([state[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[f"{dst}attn.out_proj.{kind}"] = state[f"{src}self_attn.out_proj.{kind}"]
            out[f"{dst}ln_1.{kind}"], out[f"{dst}ln_2.{kind}"] = state[f"{src}layer_norm1.{kind}"], state[f"{src}layer_norm2.{kind}"]
            out[f"{dst}mlp.c_fc.{kind}"], out[f"{dst}mlp.c_proj.{kind}"] = state[f"{src}mlp.fc1.{kind}"], state[f"{src}mlp.fc2.{kind}"]
    out[f"{prefix}token_embedding.weight"] = state["embeddings.token_embedding.weight"]
    out[f"{prefix}positional_embedding"] = state["embeddings.position_embedding.weight"]
    out[f"{prefix}ln_final.weight"], out[f"{prefix}ln_final.bias"] = state["final_layer_norm.weight"], state["final_layer_norm.bias"]
    if "text_projection.weight" in state:
        out[f"{prefix}text_projection"] = state["text_projection.weight"].T
    return out


def single_file_state(unet_state: Mapping, unet_config: dict, texts: Mapping[str, Mapping], arch: str) -> dict:
    """An original (SGM/LDM) single-file checkpoint's UNet and text encoders: ``model.diffusion_model.<SGM>``;
    SD 1.x ``cond_stage_model.transformer.text_model.…``, SD 2.x ``cond_stage_model.model.…`` (OpenCLIP),
    SDXL ``conditioner.embedders.0.transformer.text_model.…`` and ``conditioner.embedders.1.model.…``.
    (The VAE's ``first_stage_model.`` keys are left out: nothing here reads them.)"""
    from mixdiff_cli.families.unet_geometry import diffusers_to_sgm

    def hf(prefix: str, state: Mapping) -> dict:
        return {f"{prefix}text_model.{k.removeprefix('text_model.')}": v for k, v in state.items()}

    out = {}
    for key, value in unet_state.items():
        module, _, leaf = key.rpartition(".")
        out[f"model.diffusion_model.{diffusers_to_sgm(module, unet_config)}.{leaf}"] = value
    first, second = texts.get("text_encoder"), texts.get("text_encoder_2")
    if arch == "sdxl":
        out |= hf("conditioner.embedders.0.transformer.", first) | _openclip_text("conditioner.embedders.1.model.", second)
    elif arch == "sd2":
        out |= _openclip_text("cond_stage_model.model.", first)
    else:
        out |= hf("cond_stage_model.transformer.", first)
    return out


@_own_rng
def make_full_layout(pipe_folder: str | Path, out_path: str | Path, kind: str, seed: int = 5) -> Path:
    """A full-model expert of ``pipe_folder``'s geometry with other weights (from ``seed``), laid out as:

    fp16-variant: a diffusers UNet folder holding only ``diffusion_pytorch_model.fp16.safetensors``;
    single-file: an original checkpoint (``single_file_state``) with the UNet and text encoders;
    v-prediction: a diffusers pipeline folder whose scheduler predicts v;
    inpainting / inpainting-file: a 9-input-channel UNet as a folder / an original single file.
    """
    import shutil

    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file, save_file

    pipe_folder, out_path = Path(pipe_folder), Path(out_path)
    config = dict(UNet2DConditionModel.load_config(pipe_folder / "unet"))
    torch.manual_seed(seed + _SEED_UNET)
    unet = UNet2DConditionModel.from_config({**config, "in_channels": 9} if kind.startswith("inpainting") else config)
    if kind == "fp16-variant":
        unet.half().save_pretrained(out_path, variant="fp16", safe_serialization=True)
    elif kind in ("single-file", "inpainting-file"):
        texts = {n: load_file(pipe_folder / n / "model.safetensors") for n in ("text_encoder", "text_encoder_2") if (pipe_folder / n).is_dir()}
        state = single_file_state(unet.state_dict(), dict(unet.config), texts, "sdxl" if _is_sdxl(pipe_folder) else "sd1")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, out_path, metadata={"format": "pt"})
    elif kind == "v-prediction":
        shutil.copytree(pipe_folder, out_path, dirs_exist_ok=True)
        unet.save_pretrained(out_path / "unet", safe_serialization=True)
        set_prediction_type(out_path, "v_prediction")
    elif kind == "inpainting":
        unet.save_pretrained(out_path, safe_serialization=True)
    else:
        raise ValueError(f"unknown full-model layout {kind!r}")
    return out_path


def set_prediction_type(pipe_folder: str | Path, prediction_type: str) -> None:
    """Make a pipeline folder's scheduler predict ``prediction_type`` (``epsilon`` / ``v_prediction``)."""
    config_file = Path(pipe_folder) / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "prediction_type": prediction_type}, indent=2))


# ---------------------------------------------------------------------------------------------
# real geometry, headers only


def write_header_only(path: str | Path, tensors: Mapping[str, tuple[str, list[int]]], metadata: Mapping[str, str] | None = None,
                      values: Mapping[str, bytes] | None = None) -> Path:
    """A valid safetensors file of ``{name: (dtype, shape)}`` whose data section is a sparse hole (zeros),
    except ``values`` (raw little-endian bytes of small tensors, e.g. alphas). Real-size files cost a header."""
    from mixdiff_cli.catalog.headers import DTYPE_BITS

    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = DTYPE_BITS[dtype]
        for d in shape:
            size *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size // 8]}
        offset += size // 8
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads its header to 8 bytes
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, data in (values or {}).items():
            f.seek(8 + len(raw) + header[name]["data_offsets"][0])
            f.write(data)
        f.truncate(8 + len(raw) + offset)
    return path


def real_state(name: str) -> dict[str, dict]:
    """A public base's UNet and text encoders ("sd15", "sd21", "sdxl") as meta-device tensors (shapes, no
    memory), built by diffusers and transformers from the families' public configs (``catalog.geometry.public_configs``): component -> state dict."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from mixdiff_cli.catalog.geometry import public_configs

    configs, out = public_configs()[name][1], {}
    with init_empty_weights():
        out["unet"] = UNet2DConditionModel.from_config(configs["unet"]).state_dict()
        for component in ("text_encoder", "text_encoder_2"):
            if component in configs:
                cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
                cfg = CLIPTextConfig(**{k: v for k, v in configs[component].items() if k != "architectures"})
                state = cls(cfg).state_dict()  # transformers 5 names CLIPTextModel's keys without "text_model."
                out[component] = {k.removeprefix("text_model."): v for k, v in state.items() if v.dtype != torch.long}
    return out


def write_real_lora(name: str, out_path: str | Path, layout: str, rank: int = 4, alpha: float = 2.0) -> Path:
    """A header-only LoRA on every attention projection of a public base's UNet and text encoders, in the
    kohya (``kohya``) or diffusers-script (``diffusers-script``) layout, fp16 with real alpha scalars."""
    from mixdiff_cli.families.unet_geometry import diffusers_to_sgm
    from mixdiff_cli.catalog.geometry import public_configs

    sdxl = name == "sdxl"
    kohya_prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}
    tensors, values = {}, {}
    for component, state in real_state(name).items():
        for key, value in state.items():
            module = key.removesuffix(".weight")
            if not key.endswith(".weight") or not module.endswith(ATTN if component == "unet" else TEXT_ATTN):
                continue
            if component != "unet":
                module = f"text_model.{module}"
            fout, fin = value.shape[:2]
            if layout == "kohya":
                if component == "unet" and sdxl:
                    module = diffusers_to_sgm(module, public_configs()[name][1]["unet"])
                stem = kohya_prefix[component] + module.replace(".", "_")
                down, up, alpha_key = f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"
                tensors[alpha_key], values[alpha_key] = ("F16", []), struct.pack("<e", alpha)
            else:
                matrix = "lora" if component == "unet" else "lora_linear_layer"
                down, up = f"{component}.{module}.{matrix}.down.weight", f"{component}.{module}.{matrix}.up.weight"
            tensors[down], tensors[up] = ("F16", [rank, fin]), ("F16", [fout, rank])
    return write_header_only(out_path, tensors, {"ss_network_dim": str(rank)} if layout == "kohya" else None, values)


def write_real_checkpoint(name: str, out_path: str | Path, in_channels: int = 4) -> Path:
    """A header-only original single-file checkpoint (fp16) of a public base, UNet and text encoders, with
    its modelspec architecture (and prediction type for v-models); ``in_channels=9``: an inpainting UNet."""
    import torch

    from mixdiff_cli.catalog.geometry import public_configs

    state = real_state(name)
    conv_in = state["unet"]["conv_in.weight"]
    state["unet"]["conv_in.weight"] = torch.empty((conv_in.shape[0], in_channels, 3, 3), device="meta")
    arch = public_configs()[name][0]
    texts = {k: v for k, v in state.items() if k != "unet"}
    tensors = single_file_state(state["unet"], public_configs()[name][1]["unet"], texts, arch)
    spec = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-768-v", "sdxl": "stable-diffusion-xl-v1-base"}[arch]
    metadata = {"modelspec.architecture": spec}
    if public_configs()[name][1]["scheduler"]["prediction_type"] == "v_prediction":
        metadata["modelspec.prediction_type"] = "v"
    return write_header_only(out_path, {k: ("F16", list(v.shape)) for k, v in tensors.items()}, metadata)
