"""Prompt templates of zero-shot composition (textual inversion: Pic2Word), shared by train, export and runtime.

A zero-shot model composes through the CLIP text tower: the reference image is mapped to one pseudo-word
token, and the tower reads a prompt whose placeholder word is replaced by that token. A template holds the
placeholder word exactly once and the modification's slot ``{modification}`` at most once (training's
prompt, ``a photo of *``, has none). Torch-free: the runtime fills templates at query time.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from compir.errors import InputError

PLACEHOLDER = "*"  # Pic2Word's placeholder word (one token in CLIP's BPE: id 265)
SLOT = "modification"
TRAIN_PROMPT = "a photo of *"  # Pic2Word's training prompt: the image embedding vs this prompt's
DEFAULT_TEMPLATE = "a photo of * , {modification}"  # Pic2Word's CIRR / FashionIQ query prompt
# What a placeholder word inside a user's modification becomes, so the prompt holds it once (the mapped
# token replaces every position holding the placeholder's id).
PLACEHOLDER_STANDIN = " "


@dataclass(frozen=True)
class PromptTemplate:
    """A checked template: ``fill(text)`` gives the prompt the text tower reads."""

    text: str
    placeholder: str = PLACEHOLDER

    def __post_init__(self) -> None:
        problem = template_problem(self.text, self.placeholder)
        if problem:
            raise InputError(f"prompt template {self.text!r}: {problem}")

    @property
    def has_slot(self) -> bool:
        return any(field == SLOT for _, field, _, _ in string.Formatter().parse(self.text))

    def fill(self, modification: str = "") -> str:
        """The prompt for one modification; a placeholder word inside it is replaced (it would be mapped too)."""
        clean = modification.replace(self.placeholder, PLACEHOLDER_STANDIN)
        return self.text.format(**{SLOT: clean}) if self.has_slot else self.text


def template_problem(text: object, placeholder: str = PLACEHOLDER) -> str | None:
    """Why ``text`` is not a usable template (None: it is)."""
    if not isinstance(text, str) or not text.strip():
        return "a template is a non-empty string"
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(text) if field is not None]
    except ValueError as exc:
        return f"unbalanced braces ({exc}); write a literal brace as {{{{ or }}}}"
    unknown = sorted({f for f in fields if f != SLOT})
    if unknown:
        return f"unknown field(s) {', '.join('{' + f + '}' for f in unknown)}; the only field is {{{SLOT}}}"
    if len(fields) > 1:
        return f"{{{SLOT}}} appears {len(fields)} times; it may appear once"
    literal = "".join(part for part, _, _, _ in string.Formatter().parse(text))
    count = literal.split().count(placeholder)
    if count != 1:
        where = "is missing" if count == 0 else f"appears {count} times"
        return (f"the placeholder word {placeholder!r} {where}; it must appear exactly once, as a word of its own "
                f"(e.g. {DEFAULT_TEMPLATE!r})")
    if literal.count(placeholder) != 1:
        return f"the placeholder {placeholder!r} must appear once, as a word of its own (found it inside a word)"
    return None
