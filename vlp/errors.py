"""Errors every room may raise (kept apart from vlp.config so that the objective modules,
whose option classes vlp.config reads, can raise them too)."""


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message names the key."""
