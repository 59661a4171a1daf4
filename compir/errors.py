"""The exceptions compir raises on purpose. The CLI prints them as one clear line."""


class CompirError(Exception):
    """Base class: a problem the user can act on (the message says what and how)."""


class ContractError(CompirError):
    """An on-disk artifact (checkpoint, manifest, engine, index) is missing, damaged or mismatched."""


class InputError(CompirError, ValueError):
    """A query input (image, text, k, item id) is unusable."""


class DuplicateItemError(InputError):
    """Adding an item whose id the gallery already holds, without asking to replace it (HTTP 409)."""


class DatasetError(CompirError):
    """A dataset file is missing or malformed; the message names the file."""
