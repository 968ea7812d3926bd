"""The search engine's one bad-input exception; the CLI turns it into a one-line message and exit status 2."""


class SearchError(ValueError):
    """A setting, dataset or storage the search cannot use; the message says what to change."""
