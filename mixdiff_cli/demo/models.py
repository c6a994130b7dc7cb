"""The demo base's sizes and schedule (`BaseConfig`) and its modules, made from them: a small VAE, a CLIP text encoder, an SD 1.x UNet (the
family builds it), the schedulers, and the pipeline on a set of EMA weights."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mixdiff_cli import families
from mixdiff_cli.core.runtime import pick_device
from mixdiff_cli.demo import data as demo_data
from mixdiff_cli.families.unet_tiny import demo_unet

FAMILY = "sd1"  # the demo base is an SD 1.x model


@dataclass
class BaseConfig:
    """Sizes and schedule of the demo base (defaults: the real build, ~1.5 h on 2 CPU cores)."""

    seed: int = 0
    # VAE: factor 4 (64x64 RGB -> 4x16x16), ~0.7M params (NOTES).
    vae_channels: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = 4
    vae_steps: int = 1000
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl: float = 1e-6
    vae_check_images: int = 32  # per domain, checked after a VAE round trip
    # Text encoder: CLIP, hidden 64, 2 layers, 16 tokens (NOTES: ~0.1M params + vocabulary).
    text_hidden: int = 64
    text_layers: int = 2
    max_length: int = 16
    # UNet: ~3M params, cross-attention at 16x16 and 8x8 (and the 4x4 middle block).
    unet_channels: tuple[int, ...] = (32, 64, 128)
    unet_heads: tuple[int, ...] = (2, 4, 8)
    text_time_embedding: bool = True  # pooled text added to the timestep embedding (diffusers "text")
    unet_steps: int = 10000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    warmup: int = 200
    caption_dropout: float = 0.1  # for classifier-free guidance
    min_snr_gamma: float = 5.0  # Min-SNR weighting, Hang et al. (2023); 0 turns it off
    ema_decay: float = 0.999
    checkpoint_every: int = 250
    eval_every: int = 1000  # 0: never; a short adherence check on the EMA weights
    eval_images: int = 16  # per domain
    log_every: int = 50
    # Noise schedule of the DDPM paper (linear 1e-4..0.02): at 16x16 latents it leaves less signal
    # at t=T than SD's scaled_linear, so the first sampling steps are spent on layout and colour.
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02

    @classmethod
    def quick(cls, seed: int = 0) -> BaseConfig:
        """A few steps of everything, for tests."""
        return cls(seed=seed, vae_steps=4, vae_batch=8, vae_check_images=2, unet_steps=4, unet_batch=8, warmup=2,
                   checkpoint_every=2, eval_every=0, log_every=1)

    @classmethod
    def from_json(cls, d: dict) -> BaseConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def prefixed(prefix: str, sd: dict) -> dict:
    return {f"{prefix}.{k}": v for k, v in sd.items()}


def unprefixed(prefix: str, sd: dict) -> dict:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in sd.items() if k.startswith(prefix + ".")}


def make_vae(cfg: BaseConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels, layers_per_block=1, norm_num_groups=8, sample_size=demo_data.SIZE,
    )


def make_text_encoder(cfg: BaseConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, intermediate_size=4 * cfg.text_hidden,
        num_hidden_layers=cfg.text_layers, num_attention_heads=4, max_position_embeddings=cfg.max_length,
        projection_dim=cfg.text_hidden, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))


def make_unet(cfg: BaseConfig):
    factor = 2 ** (len(cfg.vae_channels) - 1)
    return demo_unet(demo_data.SIZE // factor, cfg.latent_channels, cfg.unet_channels, cfg.text_hidden, cfg.unet_heads,
                     cfg.text_time_embedding)


def make_scheduler(cfg: BaseConfig, kind: str = "ddim"):
    """DDPM for training; DDIM (trailing spacing, starts at t=T) is what the exported pipeline samples with."""
    from diffusers import DDIMScheduler, DDPMScheduler

    common = dict(num_train_timesteps=1000, beta_schedule=cfg.beta_schedule, beta_start=cfg.beta_start,
                  beta_end=cfg.beta_end, prediction_type="epsilon", clip_sample=False)
    if kind == "ddpm":
        return DDPMScheduler(**common)
    return DDIMScheduler(**common, set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing")


def load_tokenizer(folder: str | Path, max_length: int = 16):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length)


def tokenize(tokenizer, captions: Sequence[str]):
    return tokenizer(list(captions), padding="max_length", truncation=True, return_tensors="pt").input_ids




def pipeline_from_ema(ema: dict, cfg: BaseConfig, workdir: Path, tokenizer):
    """A pipeline on the EMA weights (float32, fresh modules)."""
    from diffusers import AutoencoderKL

    text_encoder, unet = make_text_encoder(cfg, tokenizer), make_unet(cfg)
    text_encoder.load_state_dict({k: v.cpu() for k, v in unprefixed("text_encoder", ema).items()})
    unet.load_state_dict({k: v.cpu() for k, v in unprefixed("unet", ema).items()})
    vae = AutoencoderKL.from_pretrained(str(workdir / "vae"))
    pipe = families.get(FAMILY).assemble(vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
                                         scheduler=make_scheduler(cfg))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(pick_device())
