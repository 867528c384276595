"""The data package's error, and the document settings it reads (defined in argonne_options, beside the command line
that makes `argonne data prepare`'s flags from them)."""

from argonne_options import DocumentSettings, document_problems

__all__ = ["DataError", "DocumentSettings", "document_problems"]


class DataError(ValueError):
    """Bad training data: the message names the file and, where it applies, the row."""
