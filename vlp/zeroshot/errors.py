class ZeroShotError(ValueError):
    """A user mistake (bad class file, template, image source, option); the message names it."""
