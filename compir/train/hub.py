"""Hugging Face Hub access where training and export load a tokenizer or a text tower by Hub id.

Without access, huggingface_hub retries each file for about 45 s (some 40 warnings) before the load
fails. So whether the Hub answers is probed once per process, in seconds (one HTTP request to its
endpoint, through the environment's proxies as huggingface_hub's own requests go); where it does not,
the load runs in offline mode: files already in the Hugging Face cache still load, anything else
fails at once, and the error says how to use a local folder instead. Where the Hub answers, nothing
changes (downloads and revalidation as usual).
"""

from __future__ import annotations

import contextlib
import functools
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "true", "yes", "on"}


def offline_by_setting() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for offline mode (huggingface_hub's own switch)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_endpoint() -> str:
    """The Hub's address as huggingface_hub uses it (``HF_ENDPOINT``, e.g. a mirror, else huggingface.co)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return str(constants.ENDPOINT)


@functools.cache
def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the Hub endpoint answers an HTTP request within ``timeout`` seconds (an error status is
    an answer); False without a request where ``HF_HUB_OFFLINE`` is set. Once per process."""
    if offline_by_setting():
        return False
    try:
        urllib.request.urlopen(urllib.request.Request(hub_endpoint(), method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):  # URLError, refused, unresolvable, timed out; a malformed HF_ENDPOINT
        return False
    return True


def is_hub_id(name: str) -> bool:
    """Whether ``name`` (a ``hf_tokenizer_name`` / ``hf_model_name``) would be fetched from the Hub: an
    ``org/name`` or ``name`` that is not a local folder (a path such as ``/models/tok`` or ``./tok`` is none)."""
    return bool(name) and not Path(name).is_dir() and not name.startswith(("/", ".", "~")) and name.count("/") <= 1


@contextlib.contextmanager
def hub_access(name: str) -> Iterator[bool]:
    """Around loading ``name`` with transformers: yields whether the Hub may be asked. Where ``name`` is a
    Hub id and the Hub does not answer, the load runs in offline mode (cache only, no retries)."""
    if not is_hub_id(name) or offline_by_setting() or hub_reachable():
        yield is_hub_id(name) and not offline_by_setting()
        return
    with _offline_mode():
        yield False


@contextlib.contextmanager
def _offline_mode() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 for this block: the variable, and huggingface_hub's copy of it read at its import."""
    from huggingface_hub import constants

    saved_env, saved_constant = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], constants.HF_HUB_OFFLINE = "1", True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved_constant
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


def load_failure(what: str, name: str, *, setting: str, loader: str, online: bool, error: BaseException) -> str:
    """The one-line error for a failed load of Hub id ``name``: why, and how to use a local folder instead.
    ``setting``: the text_cfg key naming it; ``loader``: the transformers class that saves it (AutoTokenizer)."""
    if not is_hub_id(name):
        if not Path(name).is_dir():
            return f"cannot load {what} {name!r}: no such folder (text_cfg.{setting} names a Hub id, org/name, or a local folder)"
        return f"cannot load {what} from the folder {name!r} ({type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]})"
    why = ("not in the Hugging Face cache, and the download failed" if online else
           "the Hugging Face Hub cannot be reached from here (or HF_HUB_OFFLINE is set) and it is not in the Hugging Face cache")
    return (
        f"cannot load {what} {name!r} ({type(error).__name__}): {why}; use a local folder: where the Hub answers, run "
        f"python -c \"from transformers import {loader}; {loader}.from_pretrained('{name}').save_pretrained('DIR')\", copy DIR "
        f"here and set text_cfg.{setting} to it in a model config JSON (or copy the Hugging Face cache, HF_HOME, here)"
    )
