"""Modifications of synthetic scenes and their texts: add, remove, change (colour / size / shape), move.

Each kind is phrased by several templates, and the edited object is named by a referring
expression chosen at random among those that are unique in the scene (its attributes, its
position, or both), so a model has to read the words to find the target. Public API:

- :class:`Modification` (kind, attribute, text, target)
- :func:`sample_modification` ``(scene, rng, *, kind, excluded_pairs, unseen_pairs=None, max_objects=5)``
  ``-> Modification | None`` (None where the kind does not apply to the scene)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from compir.data.synth_scene import (
    CELL_NAMES,
    COLOURS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    all_objects,
)

KINDS = ("add", "remove", "change", "move")

_ADD = (
    "add a {obj} {at}",
    "put a {obj} {in_}",
    "place a {obj} {at}",
    "insert a {obj} {in_}",
    "there should also be a {obj} {in_}",
    "draw a {obj} {at}",
)
_REMOVE = (
    "remove the {ref}",
    "delete the {ref}",
    "take away the {ref}",
    "get rid of the {ref}",
    "the {ref} should disappear",
)
_COLOUR = (
    "make the {ref} {value}",
    "change the colour of the {ref} to {value}",
    "paint the {ref} {value}",
    "turn the {ref} {value}",
    "recolour the {ref} {value}",
)
_SIZE = (
    "make the {ref} {value}",
    "change the size of the {ref} to {value}",
    "{verb} the {ref}",
    "the {ref} should be {comparative}",
    "make the {ref} {comparative}",
)
_SIZE_WORDS = {"large": ("enlarge", "bigger"), "small": ("shrink", "smaller")}
_SHAPE = (
    "turn the {ref} into a {value}",
    "change the {ref} to a {value}",
    "replace the {ref} with a {value} of the same colour and size",
    "make the {ref} a {value}",
    "reshape the {ref} as a {value}",
)
_MOVE = (
    "move the {ref} to the {pos}",
    "shift the {ref} to the {pos}",
    "relocate the {ref} to the {pos}",
    "the {ref} should go to the {pos}",
    "put the {ref} in the {pos} instead",
)
TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": _ADD,
    "remove": _REMOVE,
    "change:colour": _COLOUR,
    "change:size": _SIZE,
    "change:shape": _SHAPE,
    "move": _MOVE,
}


@dataclass(frozen=True)
class Modification:
    """One single edit of a reference scene: its kind, its text and the scene it produces.

    ``attribute`` is ``colour`` / ``size`` / ``shape`` for kind ``change``, empty otherwise.
    """

    kind: str
    text: str
    target: Scene
    attribute: str = ""


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _cell_name(rng: np.random.Generator, cell: int) -> str:
    return _pick(rng, CELL_NAMES[cell])


def refer_to(scene: Scene, cell: int, rng: np.random.Generator) -> str:
    """A referring expression for the object in ``cell`` that no other object of the scene matches.

    Attribute-only phrasings are preferred (they make the model read colours, shapes and sizes);
    positional ones are used as well, and always where the attributes are ambiguous.
    """
    obj = scene.cells[cell]
    if obj is None:
        raise ValueError(f"cell {cell} of scene {scene.key} is empty")
    others = [other for index, other in scene.objects() if index != cell]
    by_attributes: list[str] = []
    for fields in (("size", "colour", "shape"), ("colour", "shape"), ("size", "shape"), ("shape",), ("colour",)):
        if any(all(getattr(other, f) == getattr(obj, f) for f in fields) for other in others):
            continue
        words = [getattr(obj, f) for f in fields]
        by_attributes.append(" ".join(words) if "shape" in fields else " ".join(words) + " object")
    place = _cell_name(rng, cell)
    prep = "in the"
    positional = [
        f"{obj.shape} {prep} {place}",
        f"{obj.colour} {obj.shape} {prep} {place}",
        f"object {prep} {place}",
    ]
    # 3 : 1 for attributes where they identify the object.
    if by_attributes and rng.random() < 0.75:
        return _pick(rng, by_attributes)
    return _pick(rng, positional)


def _name_new_object(rng: np.random.Generator, obj: SceneObject) -> str:
    forms = (
        f"{obj.size} {obj.colour} {obj.shape}",
        f"{obj.size} {obj.shape} in {obj.colour}",
        f"{obj.colour} {obj.shape}, {obj.size},",
    )
    return _pick(rng, forms)


def sample_modification(
    scene: Scene,
    rng: np.random.Generator,
    *,
    kind: str,
    excluded_pairs: Collection[tuple[str, str]],
    unseen_pairs: Collection[tuple[str, str]] | None = None,
    max_objects: int = 5,
) -> Modification | None:
    """Sample one edit of ``kind``; its target never holds an ``excluded_pairs`` combination.

    With ``unseen_pairs`` (kinds add / change only), the edit instead *creates* one of those
    combinations: the held-out queries of the test split. Returns None where impossible
    (removing the last object, adding to a full scene, moving in a full grid, ...).
    """
    if kind == "add":
        return _add(scene, rng, excluded_pairs, unseen_pairs, max_objects)
    if kind == "change":
        return _change(scene, rng, excluded_pairs, unseen_pairs)
    if unseen_pairs is not None:
        return None  # removing or moving cannot create a new combination
    if kind == "remove":
        return _remove(scene, rng)
    if kind == "move":
        return _move(scene, rng)
    raise ValueError(f"unknown modification kind {kind!r}; expected one of {KINDS}")


def _add(
    scene: Scene,
    rng: np.random.Generator,
    excluded: Collection[tuple[str, str]],
    unseen: Collection[tuple[str, str]] | None,
    max_objects: int,
) -> Modification | None:
    empty = scene.empty_cells()
    if len(scene.objects()) >= max_objects or not empty:
        return None
    if unseen is None:
        pool = all_objects(excluded_pairs=excluded)
    else:
        pool = [o for o in all_objects() if o.pair() in unseen]
    obj = pool[int(rng.integers(len(pool)))]
    cell = empty[int(rng.integers(len(empty)))]
    place = _cell_name(rng, cell)
    text = _pick(rng, _ADD).format(obj=_name_new_object(rng, obj), at=f"at the {place}", in_=f"in the {place}")
    return Modification("add", text, scene.replace(cell, obj))


def _remove(scene: Scene, rng: np.random.Generator) -> Modification | None:
    objects = scene.objects()
    if len(objects) < 2:
        return None  # scenes keep at least one object
    cell, _ = objects[int(rng.integers(len(objects)))]
    text = _pick(rng, _REMOVE).format(ref=refer_to(scene, cell, rng))
    return Modification("remove", text, scene.replace(cell, None))


def _move(scene: Scene, rng: np.random.Generator) -> Modification | None:
    objects, empty = scene.objects(), scene.empty_cells()
    if not empty:
        return None
    cell, obj = objects[int(rng.integers(len(objects)))]
    dest = empty[int(rng.integers(len(empty)))]
    text = _pick(rng, _MOVE).format(ref=refer_to(scene, cell, rng), pos=_cell_name(rng, dest))
    return Modification("move", text, scene.replace(cell, None).replace(dest, obj))


def _change(
    scene: Scene,
    rng: np.random.Generator,
    excluded: Collection[tuple[str, str]],
    unseen: Collection[tuple[str, str]] | None,
) -> Modification | None:
    objects = scene.objects()
    cell, obj = objects[int(rng.integers(len(objects)))]
    attributes = ["colour", "shape"] if unseen is not None else ["colour", "size", "shape"]
    attribute = attributes[int(rng.integers(len(attributes)))]
    values = {"colour": COLOURS, "size": SIZES, "shape": SHAPES}[attribute]
    candidates = []
    for value in values:
        if value == getattr(obj, attribute):
            continue
        new = dataclasses.replace(obj, **{attribute: value})
        if (unseen is None and new.pair() not in excluded) or (unseen is not None and new.pair() in unseen):
            candidates.append(new)
    if not candidates:
        return None
    new = candidates[int(rng.integers(len(candidates)))]
    value = getattr(new, attribute)
    ref = refer_to(scene, cell, rng)
    template = _pick(rng, {"colour": _COLOUR, "size": _SIZE, "shape": _SHAPE}[attribute])
    verb, comparative = _SIZE_WORDS[new.size]
    text = template.format(ref=ref, value=value, verb=verb, comparative=comparative)
    return Modification("change", text, scene.replace(cell, new), attribute=attribute)
