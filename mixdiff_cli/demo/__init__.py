"""The embedded demo: procedural captioned data for four visual domains and a small base trained on it.

`mixdiff_cli.demo.data` (PIL + numpy only) generates, captions and checks images;
`mixdiff_cli.demo.base` (torch + diffusers, imported on use) trains the base pipeline.
"""
