"""Errors that name what is at fault: the file, line, key or value."""


class RagdistError(Exception):
    """Base class: a clear, user-facing error. The CLI prints it without a traceback."""


class DataError(RagdistError):
    """Bad input data: missing file, malformed row, empty corpus, bad encoding."""


class IndexError_(RagdistError):
    """A snapshot that is missing, corrupted or does not match the embedder."""


class RetrievalError(RagdistError):
    """The retrieval service failed or was asked something it cannot answer."""


class ConfigError(RagdistError):
    """A configuration value that cannot work (after the schema accepted its type)."""


def cause(e: BaseException) -> str:
    """The useful line of a (possibly remote, multi-line) exception."""
    msg = [m.strip() for m in str(e).strip().splitlines() if m.strip()]
    useful = [m for m in msg if "Error" in m and "Traceback" not in m] or msg
    return useful[-1] if useful else type(e).__name__
