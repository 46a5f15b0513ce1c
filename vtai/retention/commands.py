"""`vtai retention run, vtai user export/delete, vtai backup/restore` (being built)."""


def register(sub, user) -> None:
    """Add this module's commands: `sub` is vtai's subcommands, `user` those of `vtai user`."""
