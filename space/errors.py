"""The one exception type of the search space: bad input, stated so a user can fix it."""


class SpaceError(ValueError):
    """A base YAML, space file or choice that cannot be used; the message says what to change."""


def first_line(err: BaseException) -> str:
    """The first line of an error's message (YAML and Ultralytics errors run to several), or its type name."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
