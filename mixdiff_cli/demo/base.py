"""Train the demo's small Stable-Diffusion-format base from scratch: a VAE, then text encoder + UNet.

Every stage checkpoints to `workdir/ckpt/<stage>/step-NNNNNNN/` (safetensors weights, optimizer
tensors in safetensors, the rest in JSON; nothing is pickled) and a rerun continues from the latest
one. Randomness is drawn per step from `(seed, step)`, so a resumed run repeats the batches an
uninterrupted one would have seen. The result is a folder that plain
`diffusers.StableDiffusionPipeline.from_pretrained(folder)` loads.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mixdiff_cli.core.checkpoints import read_checkpoint, write_checkpoint
from mixdiff_cli.core.errors import MixdiffError
from mixdiff_cli.core.fsutil import atomic_folder, atomic_path
from mixdiff_cli.core.runtime import pick_device
from mixdiff_cli.demo import data as demo_data
from mixdiff_cli.demo import measure as demo_measure
from mixdiff_cli.demo.models import (
    BaseConfig,
    load_tokenizer,
    make_scheduler,
    make_text_encoder,
    make_unet,
    make_vae,
    pipeline_from_ema,
    prefixed,
    tokenize,
    unprefixed,
)

Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# Data


def load_folders(folders: Sequence[str | Path]) -> tuple[np.ndarray, list[str]]:
    """Images (N, 64, 64, 3) uint8 and captions of kohya folders (`NNNN.png` + `NNNN.txt`)."""
    from PIL import Image

    images, captions = [], []
    for folder in folders:
        for png in sorted(Path(folder).glob("*.png")):
            with Image.open(png) as im:
                images.append(np.asarray(im.convert("RGB").resize((demo_data.SIZE, demo_data.SIZE))))
            txt = png.with_suffix(".txt")
            captions.append(txt.read_text(encoding="utf-8").strip() if txt.exists() else "")
    if not images:
        raise MixdiffError(f"no .png images in {', '.join(map(str, folders))}", "run stage 1 of scripts/build_demo first")
    return np.stack(images), captions


def _to_tensor(images: np.ndarray, dev):
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).to(dev)
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # (B, 3, H, W) in [-1, 1]


# ---------------------------------------------------------------------------------------------
# Checkpoints: safetensors + JSON, never pickle (mixdiff_cli.core.checkpoints).

WEIGHTS = "weights.safetensors"


def save_checkpoint(root: Path, step: int, tensors: dict, optimizer, meta: dict, keep: int = 2) -> Path:
    """Write `root/step-NNNNNNN/` atomically, keeping the last `keep`."""
    for stale in root.glob(".step-*.partial"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    final = write_checkpoint(root / f"step-{step:07d}", tensors, optimizer.state_dict(), {"step": step, **meta}, WEIGHTS)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete `step-*` folder under `root`, if any."""
    done = [p for p in sorted(root.glob("step-*")) if (p / "state.json").exists()]
    return done[-1] if done else None


def load_checkpoint(path: Path, optimizer) -> tuple[dict, dict]:
    """Weights (name -> tensor) and JSON state of a checkpoint; restores `optimizer` in place."""
    weights, opt_state, state = read_checkpoint(path, WEIGHTS)
    if opt_state is not None:  # a snapshot (see snapshot_checkpoint) has none: fresh moments
        optimizer.load_state_dict(opt_state)
    return {k: v.float() for k, v in weights.items()}, state


def snapshot_checkpoint(path: Path, out: Path) -> Path:
    """A compact copy of a checkpoint to carry a build across machines: fp16 weights, no optimizer state."""
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    return write_checkpoint(out, {k: v.half() for k, v in load_file(str(path / WEIGHTS)).items()}, None, state, WEIGHTS)


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of `peak`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


# ---------------------------------------------------------------------------------------------
# Stage 2: VAE


def train_vae(folders: Sequence[str | Path], workdir: str | Path, cfg: BaseConfig, log: Log = print) -> Path:
    """Train the VAE (MSE + small KL), resuming from `workdir/ckpt/vae`; save it to `workdir/vae`."""
    import torch

    workdir = Path(workdir)
    out, ckpt_root = workdir / "vae", workdir / "ckpt" / "vae"
    dev = pick_device()
    images, _ = load_folders(folders)
    vae = make_vae(cfg).to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    step = 0
    if (ck := latest_checkpoint(ckpt_root)) is not None:
        weights, state = load_checkpoint(ck, opt)
        vae.load_state_dict(weights)
        step = state["step"]
        log(f"vae: resuming at step {step} from {ck}")
    log(f"vae: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M params, {len(images)} images, device {dev}")
    t0, run_loss = time.time(), []
    vae.train()
    while step < cfg.vae_steps:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(len(images), (cfg.vae_batch,), generator=g).numpy()
        x = _to_tensor(images[idx], dev)  # (B, 3, 64, 64)
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg.vae_steps, cfg.vae_lr, min(cfg.warmup, cfg.vae_steps // 10 + 1))
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(dev)
        rec = vae.decode(z).sample
        loss = torch.nn.functional.mse_loss(rec, x) + cfg.vae_kl * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        run_loss.append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.vae_steps:
            sps = (time.time() - t0) / len(run_loss)
            log(f"vae step {step}/{cfg.vae_steps} loss {np.mean(run_loss):.4f} {sps:.2f} s/step")
            t0, run_loss = time.time(), []
        if step % cfg.checkpoint_every == 0 or step == cfg.vae_steps:
            save_checkpoint(ckpt_root, step, vae.state_dict(), opt, {"config": asdict(cfg)})
    vae.eval()
    metrics = vae_metrics(vae, images, cfg)
    vae.register_to_config(scaling_factor=metrics["scaling_factor"])
    log("vae: " + json.dumps(metrics))
    with atomic_folder(out) as tmp:
        vae.save_pretrained(str(tmp))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return out


def vae_metrics(vae, images: np.ndarray, cfg: BaseConfig) -> dict:
    """Recon MSE (on [-1, 1], mean latents), latent std -> scaling factor, checker accuracy after a round trip."""
    import torch

    dev = next(vae.parameters()).device
    rng = np.random.default_rng(cfg.seed)
    idx = rng.choice(len(images), size=min(1024, len(images)), replace=False)
    with torch.no_grad():
        means = torch.cat([vae.encode(_to_tensor(images[idx[i:i + 256]], dev)).latent_dist.mean
                           for i in range(0, len(idx), 256)])
        x = _to_tensor(images[idx[:256]], dev)
        mse = torch.nn.functional.mse_loss(vae.decode(means[: len(x)]).sample, x).item()
    out = {"recon_mse": mse, "latent_mean": means.mean().item(), "latent_std": means.std().item(),
           "scaling_factor": 1.0 / max(means.std().item(), 1e-6)}
    for domain in demo_data.DOMAINS:  # fresh images, not the training set
        samples = demo_data.generate(domain, cfg.vae_check_images, seed=10_000 + cfg.seed)
        with torch.no_grad():
            x = _to_tensor(np.stack([np.asarray(s.image) for s in samples]), dev)
            rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        out[f"roundtrip_{domain}"] = demo_measure.accuracy(domain, _to_pil(rec), [s.attrs for s in samples])["all"]
    return out


def _to_pil(x) -> list:
    from PIL import Image

    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def encode_latents(vae_dir: str | Path, folders: Sequence[str | Path], out_file: str | Path) -> Path:
    """Mean latents (N, 4, 16, 16) of every image, unscaled, with captions, in one safetensors file."""
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    dev = pick_device()
    vae = AutoencoderKL.from_pretrained(str(vae_dir)).to(dev).eval()
    images, captions = load_folders(folders)
    with torch.no_grad():
        lat = torch.cat([vae.encode(_to_tensor(images[i:i + 256], dev)).latent_dist.mean.cpu()
                         for i in range(0, len(images), 256)])
    out_file = Path(out_file)
    with atomic_path(out_file) as tmp:
        save_file({"latents": lat.contiguous()}, str(tmp), metadata={"captions": json.dumps(captions)})
    return out_file


# ---------------------------------------------------------------------------------------------
# Stage 3: text encoder + UNet


@dataclass
class _Joint:
    """What stage 3 trains: the text encoder and UNet, their optimizer, and the EMA of both (by prefixed name)."""

    text_encoder: Any
    unet: Any
    opt: Any
    ema: dict

    @property
    def params(self) -> list:
        return list(self.text_encoder.parameters()) + list(self.unet.parameters())

    def weights(self) -> dict:
        return {**prefixed("text_encoder", self.text_encoder.state_dict()), **prefixed("unet", self.unet.state_dict())}

    def live(self) -> dict:
        return {**prefixed("text_encoder", dict(self.text_encoder.named_parameters())), **prefixed("unet", dict(self.unet.named_parameters()))}


def _joint(cfg: BaseConfig, tokenizer: Any, ckpt_root: Path, dev: Any, log: Log) -> tuple[_Joint, int]:
    """Fresh modules from `cfg.seed`, or the newest checkpoint's; returns them and the step reached."""
    import torch

    torch.manual_seed(cfg.seed)
    text_encoder, unet = make_text_encoder(cfg, tokenizer).to(dev), make_unet(cfg).to(dev)
    opt = torch.optim.AdamW(list(text_encoder.parameters()) + list(unet.parameters()), lr=cfg.unet_lr, weight_decay=0.01)
    joint = _Joint(text_encoder, unet, opt, {})
    joint.ema = {k: v.detach().clone().float() for k, v in joint.weights().items()}
    step = 0
    if (ck := latest_checkpoint(ckpt_root)) is not None:
        weights, state = load_checkpoint(ck, opt)
        text_encoder.load_state_dict(unprefixed("text_encoder", weights))
        unet.load_state_dict(unprefixed("unet", weights))
        joint.ema = {k[4:]: v.to(dev) for k, v in weights.items() if k.startswith("ema.")}
        step = state["step"]
        log(f"unet: resuming at step {step} from {ck}")
    return joint, step


def _unet_step(joint: _Joint, batch: tuple[Any, Any, Any], sched: Any, weight: Any, cfg: BaseConfig, step: int) -> float:
    """One optimizer step on a (latents, token ids, generator) batch (`_batch`) and the EMA update; returns
    the batch's mean MSE."""
    import torch

    x0, tok, g = batch
    dev = x0.device
    noise = torch.randn(x0.shape, generator=g).to(dev)
    t = torch.randint(0, sched.config.num_train_timesteps, (cfg.unet_batch,), generator=g).to(dev)
    noisy = sched.add_noise(x0, noise, t)
    for group in joint.opt.param_groups:
        group["lr"] = _lr(step, cfg.unet_steps, cfg.unet_lr, cfg.warmup)
    cond = joint.text_encoder(tok)[0]  # (B, 16, hidden)
    pred = joint.unet(noisy, t, encoder_hidden_states=cond).sample
    per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
    loss = (weight[t] * per_sample).mean()
    joint.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(joint.params, 1.0)
    joint.opt.step()
    done = step + 1  # steps taken, this one included
    decay = min(cfg.ema_decay, (1 + done) / (10 + done))
    with torch.no_grad():
        for k, p in joint.live().items():
            joint.ema[k].lerp_(p.detach(), 1 - decay)
    return per_sample.mean().item()


def _batch(data: tuple[Any, Any, Any], cfg: BaseConfig, step: int) -> tuple[Any, Any, Any]:
    """The step's random batch (latents, token ids with captions dropped) and its generator, drawn in the
    order the training step continues drawing from."""
    import torch

    latents, ids, empty = data
    dev = latents.device
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    idx = torch.randint(len(latents), (cfg.unet_batch,), generator=g).to(dev)
    tok = ids[idx].clone()
    drop = (torch.rand(cfg.unet_batch, generator=g) < cfg.caption_dropout).to(dev)
    tok[drop] = empty
    return latents[idx], tok, g


def train_unet(workdir: str | Path, cfg: BaseConfig, log: Log = print, stop_at: int | None = None) -> Path:
    """Train text encoder and UNet jointly on `workdir/latents.safetensors`, with EMA; resumable.

    `stop_at` ends this call early at that step (checkpointed; a later call continues). Returns the
    newest checkpoint folder; `export_pipeline` turns it into a pipeline.
    """
    import torch

    workdir = Path(workdir)
    ckpt_root, dev = workdir / "ckpt" / "unet", pick_device()
    data, tokenizer = _unet_data(workdir, cfg, dev)
    joint, step = _joint(cfg, tokenizer, ckpt_root, dev, log)
    n_unet, n_text = (sum(p.numel() for p in m.parameters()) for m in (joint.unet, joint.text_encoder))
    log(f"unet: {n_unet / 1e6:.2f}M params, text encoder {n_text / 1e6:.2f}M, {len(data[0])} latents, device {dev}")
    sched = make_scheduler(cfg, "ddpm")
    alphas_cumprod = sched.alphas_cumprod.to(dev)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    weight = torch.clamp(snr, max=cfg.min_snr_gamma) / snr if cfg.min_snr_gamma > 0 else torch.ones_like(snr)
    t0, run_loss = time.time(), []
    joint.text_encoder.train()
    joint.unet.train()
    end = min(cfg.unet_steps, stop_at or cfg.unet_steps)
    while step < end:
        run_loss.append(_unet_step(joint, _batch(data, cfg, step), sched, weight, cfg, step))
        step += 1
        if step % cfg.log_every == 0 or step == cfg.unet_steps:
            sps = (time.time() - t0) / len(run_loss)
            eta = (cfg.unet_steps - step) * sps / 60
            log(f"unet step {step}/{cfg.unet_steps} mse {np.mean(run_loss):.4f} {sps:.2f} s/step, ~{eta:.0f} min left")
            t0, run_loss = time.time(), []
        if step % cfg.checkpoint_every == 0 or step == end:
            save_checkpoint(ckpt_root, step, {**joint.weights(), **prefixed("ema", joint.ema)}, joint.opt, {"config": asdict(cfg)})
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.unet_steps):
            te = time.time()
            acc = evaluate(pipeline_from_ema(joint.ema, cfg, workdir, tokenizer), n_per_domain=cfg.eval_images, seed=cfg.seed, steps=20)
            log(f"unet eval step {step}: " + json.dumps(_round(acc)) + f" ({time.time() - te:.0f} s)")
            t0 = time.time()
    return latest_checkpoint(ckpt_root)


def _unet_data(workdir: Path, cfg: BaseConfig, dev: Any) -> tuple[tuple[Any, Any, Any], Any]:
    """(scaled latents (N, 4, 16, 16), token ids (N, 16), the empty caption's ids (1, 16)) on `dev`, and the tokenizer."""
    from safetensors import safe_open

    with safe_open(str(workdir / "latents.safetensors"), "pt") as f:
        latents = f.get_tensor("latents")
        captions = json.loads(f.metadata()["captions"])
    scale = json.loads((workdir / "vae" / "config.json").read_text())["scaling_factor"]
    tokenizer = load_tokenizer(workdir / "tokenizer", cfg.max_length)
    data = ((latents * scale).to(dev), tokenize(tokenizer, captions).to(dev), tokenize(tokenizer, [""]).to(dev))
    return data, tokenizer


def _round(x):
    return {k: _round(v) for k, v in x.items()} if isinstance(x, dict) else round(x, 3)


def export_pipeline(workdir: str | Path, out: str | Path, cfg: BaseConfig | None = None, fp16: bool = True) -> Path:
    """Save the EMA weights of the newest UNet checkpoint as a diffusers pipeline folder at `out`."""
    from safetensors.torch import load_file, save_file

    workdir, out = Path(workdir), Path(out)
    ck = latest_checkpoint(workdir / "ckpt" / "unet")
    if ck is None:
        raise MixdiffError(f"no UNet checkpoint under {workdir / 'ckpt' / 'unet'}", "run stage 3 of scripts/build_demo first")
    state = json.loads((ck / "state.json").read_text())
    cfg = cfg or BaseConfig.from_json(state["config"])
    tokenizer = load_tokenizer(workdir / "tokenizer", cfg.max_length)
    ema = {k[4:]: v for k, v in load_file(str(ck / "weights.safetensors")).items() if k.startswith("ema.")}
    pipe = pipeline_from_ema(ema, cfg, workdir, tokenizer).to("cpu")
    with atomic_folder(out) as tmp:
        pipe.save_pretrained(str(tmp))
        if fp16:  # UNet and VAE weights in half precision; diffusers loads them as float32 unless told otherwise
            for file in (tmp / "unet" / "diffusion_pytorch_model.safetensors", tmp / "vae" / "diffusion_pytorch_model.safetensors"):
                save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(str(file)).items()},
                          str(file), metadata={"format": "pt"})
        (tmp / "mixdiff_base.json").write_text(json.dumps({"step": state["step"], "config": asdict(cfg)}, indent=1))
    return out


def check_export(workdir: str | Path, exported: str | Path, n_per_domain: int = 32, log: Log = print) -> dict:
    """Adherence of the exported (fp16-stored) pipeline, and how far its images are from the float32 EMA's."""
    import torch
    from safetensors.torch import load_file

    from mixdiff_cli.models.pipeline import load_pipeline

    workdir = Path(workdir)
    ck = latest_checkpoint(workdir / "ckpt" / "unet")
    cfg = BaseConfig.from_json(json.loads((ck / "state.json").read_text())["config"])
    ema = {k[4:]: v for k, v in load_file(str(ck / "weights.safetensors")).items() if k.startswith("ema.")}
    fp32 = pipeline_from_ema(ema, cfg, workdir, load_tokenizer(workdir / "tokenizer", cfg.max_length))
    stored = load_pipeline(exported, device=pick_device())
    prompts = [s.caption for d in demo_data.DOMAINS for s in demo_data.generate(d, 4, seed=30_000)]
    kw = dict(num_inference_steps=20, guidance_scale=5.0, output_type="np")
    a = fp32(prompts, generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))], **kw).images
    b = stored(prompts, generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))], **kw).images
    out = {"fp16_vs_fp32_max_abs": float(np.abs(a - b).max()), "fp16_vs_fp32_mean_abs": float(np.abs(a - b).mean()),
           "train_wording": _round(evaluate(stored, n_per_domain, seed=1)),
           "heldout_wording": _round(evaluate(stored, n_per_domain, seed=1, split="heldout"))}
    (Path(exported) / "eval.json").write_text(json.dumps(out, indent=1))
    log("base export check: " + json.dumps(out))
    return out


# ---------------------------------------------------------------------------------------------
# Evaluation


def evaluate(pipe, n_per_domain: int = 16, seed: int = 0, steps: int = 20, guidance: float = 5.0,
             split: demo_data.Split = "train", domains: Sequence[str] = demo_data.DOMAINS,
             batch: int = 16) -> dict[str, dict[str, float]]:
    """Prompt adherence: generate from captions of fresh samples and check each attribute."""
    import torch

    out = {}
    for domain in domains:
        samples = demo_data.generate(domain, n_per_domain, seed=20_000 + seed, split=split)
        images = []
        for i in range(0, len(samples), batch):
            chunk = samples[i:i + batch]
            gens = [torch.Generator().manual_seed(seed * 1000 + i + j) for j in range(len(chunk))]
            images += pipe([s.caption for s in chunk], num_inference_steps=steps, guidance_scale=guidance,
                           generator=gens, output_type="pil").images
        out[domain] = demo_measure.accuracy(domain, images, [s.attrs for s in samples])
    out["mean_all"] = {"all": float(np.mean([out[d]["all"] for d in domains]))}
    return out
