"""Tiny real pipelines of the UNet families, built from configs (~1M-param UNet, 64x64 images), for tests,
benchmarks and the demo's stand-in: what `Family.build_tiny` writes. Saved with `save_pretrained`, so they
are read back through the path a real checkpoint takes."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mixdiff_cli.core.tokenizer import BOS, EOS, write_clip_tokenizer

# Component seeds are offset from the user's seed so that each part gets its own random init.
SEED_UNET, SEED_VAE, SEED_TEXT, SEED_TEXT2 = 0, 1000, 2000, 3000


def scheduler() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)  # fmt: skip


def vae(seed: int) -> Any:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed + SEED_VAE)  # callers hold torch.random.fork_rng()
    # two blocks -> vae_scale_factor 2: 32x32 latents decode to 64x64 images
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(32, 64), layers_per_block=1,
                         latent_channels=4, norm_num_groups=32, sample_size=64)  # fmt: skip


def tokenizer(folder: Path, words: Iterable[str], pad: str = EOS) -> Any:
    """A CLIP tokenizer of one token per word (see mixdiff_cli.core.tokenizer), saved in `folder`."""
    from transformers import CLIPTokenizer

    write_clip_tokenizer(folder, words)
    tok = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), bos_token=BOS, eos_token=EOS,
                        unk_token=EOS, pad_token=pad, model_max_length=77)  # fmt: skip
    tok.save_pretrained(folder)
    return tok


def text_config(tok: Any, hidden: int, projection_dim: int | None = None) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, projection_dim=projection_dim or hidden,
                          hidden_act="quick_gelu")  # fmt: skip


def unet(seed: int, **layout: Any) -> Any:
    """The tiny UNet: latents (4, 32, 32) -> 64x64 images, two blocks; `layout` sets the blocks and conditioning."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed + SEED_UNET)  # callers hold torch.random.fork_rng()
    return UNet2DConditionModel(sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                                attention_head_dim=(2, 4), norm_num_groups=32, **layout)


def build_sd1(folder: Path, seed: int, words: Iterable[str]) -> None:
    """A StableDiffusionPipeline: one CLIP text encoder of width 32, cross-attention in both blocks."""
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    tok = tokenizer(folder / "tokenizer", words)
    torch.manual_seed(seed + SEED_TEXT)
    text_encoder = CLIPTextModel(text_config(tok, hidden=32))
    denoiser = unet(seed, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32)  # = text width
    pipe = StableDiffusionPipeline(vae=vae(seed), text_encoder=text_encoder, tokenizer=tok, unet=denoiser, scheduler=scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)


def build_sdxl(folder: Path, seed: int, words: Iterable[str]) -> None:
    """A StableDiffusionXLPipeline: two text encoders, a text_time UNet with SDXL's block pattern."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tok = tokenizer(folder / "tokenizer", words)
    tok2 = tokenizer(folder / "tokenizer_2", words, pad="!")  # SDXL's second tokenizer pads with "!"
    torch.manual_seed(seed + SEED_TEXT)
    text_encoder = CLIPTextModel(text_config(tok, hidden=32))
    torch.manual_seed(seed + SEED_TEXT2)
    text_encoder_2 = CLIPTextModelWithProjection(text_config(tok2, hidden=32, projection_dim=32))
    time_dim = 8
    denoiser = unet(
        seed,
        # like SDXL: no attention in the first block, several transformer layers deeper
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), use_linear_projection=True,
        cross_attention_dim=64,  # hidden(te1) + hidden(te2) = 32 + 32
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + 32,  # 6 time ids * time_dim + pooled te2 projection
    )  # fmt: skip
    pipe = StableDiffusionXLPipeline(vae=vae(seed), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tok,
                                     tokenizer_2=tok2, unet=denoiser, scheduler=scheduler(), force_zeros_for_empty_prompt=True,
                                     add_watermarker=False)
    pipe.save_pretrained(folder, safe_serialization=True)


def demo_unet(size: int, latent_channels: int, channels: tuple[int, ...], context: int, heads: tuple[int, ...], text_embedding: bool) -> Any:
    """The embedded demo's SD 1.x UNet: three blocks (cross-attention in the first two and the middle), a
    `size` x `size` latent, cross-attention of width `context`; `text_embedding` adds the pooled text to the
    timestep embedding (diffusers' "text" addition)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=size, in_channels=latent_channels, out_channels=latent_channels,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=channels, layers_per_block=1, norm_num_groups=8, cross_attention_dim=context, attention_head_dim=heads,
        addition_embed_type="text" if text_embedding else None, addition_embed_type_num_heads=4,
    )  # fmt: skip
