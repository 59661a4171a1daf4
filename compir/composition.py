"""How an export composes a query, as its manifest records it (``"composition"`` in ``manifest.json``).

Two kinds of export compose a reference image with a modification text:

- a learned composer (the head's name: ``combiner``, ``tgcir``, ...): the ``composer`` graph takes the
  image features and the text features (trained on triplets);
- zero-shot by textual inversion (``pic2word``): the ``token_mapper`` graph maps the reference's image
  features to a pseudo-word token and the ``prompt_encoder`` graph reads a prompt whose placeholder word
  is replaced by it; the prompt is ``prompt_template`` filled with the modification
  (:class:`compir.prompts.PromptTemplate`), the placeholder word's token id ``placeholder_id``.

Torch-free: the runtime reads it. A zero-shot manifest is written with schema version 2
(:data:`compir.contracts.MANIFEST_SCHEMA`), so a runtime older than it refuses the export with "upgrade
compir" instead of failing on a missing composer graph; learned-composer manifests stay at version 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from compir.errors import ContractError, InputError
from compir.prompts import PromptTemplate, template_problem

# Heads that compose through the text tower (their graphs: token_mapper + prompt_encoder, no composer).
ZERO_SHOT_KINDS = ("pic2word",)


@dataclass(frozen=True)
class CompositionSpec:
    """The composition kind and, for a zero-shot kind, its prompt template and placeholder word."""

    kind: str  # the head's name
    prompt_template: str = ""  # zero-shot only: e.g. "a photo of * , {modification}"
    placeholder: str = ""  # zero-shot only: the word the pseudo token replaces, e.g. "*"
    placeholder_id: int = -1  # zero-shot only: its token id in the export's tokenizer

    @property
    def zero_shot(self) -> bool:
        return self.kind in ZERO_SHOT_KINDS

    def problem(self) -> str | None:
        """What makes this record unusable (one line), or None."""
        if not self.kind:
            return "the composition kind is empty"
        if not self.zero_shot:
            if self.prompt_template or self.placeholder:
                return f"a prompt template is recorded for {self.kind!r}, which composes with a learned composer"
            return None
        if self.placeholder_id < 0:
            return f"zero-shot kind {self.kind!r} records no placeholder token id"
        why = template_problem(self.prompt_template, self.placeholder or "*")
        return f"prompt template {self.prompt_template!r}: {why}" if why else None

    def template(self, override: str | None = None) -> PromptTemplate:
        """The template queries are filled with: ``override`` (a query-time template) or the recorded one.

        InputError on a learned composer (it has no prompt) or on a bad template, with the reason."""
        if not self.zero_shot:
            raise InputError(f"this export composes with a learned composer ({self.kind!r}); a prompt template applies "
                             f"to zero-shot exports only ({', '.join(ZERO_SHOT_KINDS)})")
        return PromptTemplate(self.prompt_template if override is None else override, placeholder=self.placeholder)

    @classmethod
    def from_dict(cls, raw: Any, *, source: str) -> CompositionSpec:
        if not isinstance(raw, dict):
            raise ContractError(f"{source}: composition must be an object, got {type(raw).__name__}")
        try:
            return cls(kind=str(raw["kind"]), prompt_template=str(raw.get("prompt_template", "")),
                       placeholder=str(raw.get("placeholder", "")), placeholder_id=int(raw.get("placeholder_id", -1)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ContractError(f"{source}: malformed composition ({type(exc).__name__}: {exc})") from exc


def check_prompt_ids(input_ids: np.ndarray, *, placeholder_id: int, texts: Sequence[str]) -> None:
    """InputError unless each row of the (B, L) prompt ids holds the placeholder's id exactly once: a
    template whose placeholder follows the modification loses it when a long text is cut at the context."""
    counts = (np.asarray(input_ids) == placeholder_id).sum(axis=1)
    for row, count in enumerate(counts.tolist()):
        if count != 1:
            where = "was cut off at the model's context length (shorten the text)" if count == 0 else f"appears {count} times"
            raise InputError(f"text {texts[row][:60]!r}: the prompt's placeholder token {where}")
