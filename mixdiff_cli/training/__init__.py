"""Making experts: image-caption datasets, the denoising loss, LoRA fine-tuning."""
