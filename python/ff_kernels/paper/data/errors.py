"""The error every data loader raises for a data set that is missing or damaged.

Loaders subclass :class:`DataError` (together with the matching built-in error, e.g.
``FileNotFoundError``), so ``ff-train`` reports any of them as one clear line.
"""


class DataError(Exception):
    """A data set is missing, truncated, corrupt, or not in the expected format."""
