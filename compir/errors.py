"""The exceptions compir raises on purpose. The CLI prints them as one clear line."""


class CompirError(Exception):
    """Base class: a problem the user can act on (the message says what and how)."""


class ContractError(CompirError):
    """An on-disk artifact (checkpoint, manifest, engine, index) is missing, damaged or mismatched."""


class InputError(CompirError, ValueError):
    """A query input (image, text, k, item id) is unusable."""


class DuplicateItemError(InputError):
    """Adding an item whose id the gallery already holds, without asking to replace it (HTTP 409)."""


class UnavailableError(CompirError):
    """Something a request needs is down for now and being restarted (HTTP 503 with Retry-After)."""

    def __init__(self, message: str, *, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DatasetError(CompirError):
    """A dataset file is missing or malformed; the message names the file."""
