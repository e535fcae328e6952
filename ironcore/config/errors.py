"""The one exception a user's configuration mistake raises."""

from __future__ import annotations


class ConfigError(ValueError):
    """All problems found in a configuration, reported together (also raised at run time when a
    value turns out wrong, e.g. a dataset path that does not exist; a ValueError, as it is one).

    ``errors`` holds one human-readable line per problem; each names the ``group.key`` (or file), where
    the value was set and what is allowed. The CLI prints them and exits with status 2.
    """

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        count = len(self.errors)
        header = f"{count} configuration error{'s' if count != 1 else ''}:"
        super().__init__("\n".join([header, *(f"  - {e}" for e in self.errors)]))
