"""From a route to images: the mixture denoiser, the engine, one-prompt and batch workflows, PNG metadata."""
