"""(being built)"""


def register(app) -> None:
    """Add this module's routes."""
