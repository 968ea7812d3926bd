"""The one exception type of the search space: bad input, stated so a user can fix it."""


class SpaceError(ValueError):
    """A base YAML, space file or choice that cannot be used; the message says what to change."""
