"""mixdiff: a Mixture of Diffusers. The library API; the CLI (`mixdiff_cli.cli`) is a thin layer over it.

Importing this package is cheap: torch and diffusers load only when a function that needs them runs.
"""

__version__ = "0.1.0"
