"""The router's typed errors: an unusable checkpoint or request, a stale checkpoint, a missing encoder."""

from __future__ import annotations

from mixdiff_cli.core.errors import MixdiffError
from mixdiff_cli.routing.route import RouteSpecError


class RouterError(MixdiffError):
    """A router checkpoint or routing request that cannot be used."""


class StaleRouter(RouterError):
    """The router checkpoint was made for other experts, another base or another encoder."""


class EncoderUnavailable(RouterError):
    """The requested prompt encoder is not installed or cannot run."""


class RouteOptionError(RouteSpecError):
    """A routing option out of range (exit 2)."""
