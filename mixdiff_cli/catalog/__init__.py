"""The catalog: the typed experts.yaml, reading weight files' headers, hub sources."""
