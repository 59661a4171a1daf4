"""Scenes of compir's synthetic benchmark (CSS-like): the scene model, its rendering and its captions.

A scene is a 3x3 grid; each cell holds at most one object (a shape, a colour, a size). A scene's
canonical key (:attr:`Scene.key`) is its image name, so identical scenes share one name and one
label everywhere (a duplicate target counts as a hit).

Public API (torch-free; the trainer renders fresh scenes every epoch with it):

- :class:`SceneObject`, :class:`Scene` (frozen), :func:`parse_scene_key` (name -> scene)
- :func:`render_scene` ``(scene, *, size=64) -> PIL.Image`` and :func:`render_scene_array`
  ``(scene, *, size=64) -> np.ndarray (S, S, 3) uint8`` (the fast path, ~20k scenes/s)
- :func:`scene_caption` ``(scene) -> str``: a description for text -> image retrieval
- :func:`scene_identity` ``(scene) -> str``: its object identity (MMRef), the objects without their layout
- :func:`key_legend` ``() -> str``: one line saying how to read a scene key (the demo shows it)
- :func:`sample_scene` ``(rng, *, max_objects=5, allowed=...) -> Scene``

Modifications and their texts are in :mod:`compir.data.synth_edits`.
"""

from __future__ import annotations

import functools
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "purple", "cyan", "orange", "gray")
SIZES = ("small", "large")
GRID = 3
N_CELLS = GRID * GRID

RGB = {
    "red": (215, 38, 38),
    "green": (34, 160, 60),
    "blue": (38, 78, 215),
    "yellow": (235, 200, 20),
    "purple": (135, 55, 175),
    "cyan": (30, 190, 205),
    "orange": (245, 130, 25),
    "gray": (115, 115, 115),
}
BACKGROUND = (250, 250, 247)
# Fraction of the cell side an object spans; far enough apart that a size change is visible at 64 px.
_EXTENT = {"small": 0.48, "large": 0.9}
_SUPERSAMPLE = 4  # sprites are drawn 4x larger and reduced, so edges are anti-aliased

# Names of the cells (row-major); several phrasings each so a model must read, not match strings.
CELL_NAMES: tuple[tuple[str, ...], ...] = (
    ("top left", "upper left"),
    ("top middle", "top center"),
    ("top right", "upper right"),
    ("middle left", "center left"),
    ("center", "middle"),
    ("middle right", "center right"),
    ("bottom left", "lower left"),
    ("bottom middle", "bottom center"),
    ("bottom right", "lower right"),
)

_SHAPE_CODE = {"circle": "c", "square": "s", "triangle": "t"}
_SIZE_CODE = {"small": "S", "large": "L"}
_EMPTY = "x"


@dataclass(frozen=True, order=True)
class SceneObject:
    shape: str
    colour: str
    size: str

    def pair(self) -> tuple[str, str]:
        """The (shape, colour) combination that the test split holds out of training."""
        return (self.shape, self.colour)


@dataclass(frozen=True)
class Scene:
    """``cells[i]`` is the object in grid cell i (row-major, 0 = top left) or None."""

    cells: tuple[SceneObject | None, ...]

    def __post_init__(self) -> None:
        if len(self.cells) != N_CELLS:
            raise ValueError(f"a scene has {N_CELLS} cells, got {len(self.cells)}")

    @functools.cached_property
    def key(self) -> str:
        """Canonical name, e.g. ``x-c0S-x-x-t3L-x-x-x-x`` (shape letter, colour index, size letter)."""
        return "-".join(_EMPTY if obj is None else _object_code(obj) for obj in self.cells)

    def objects(self) -> list[tuple[int, SceneObject]]:
        return [(cell, obj) for cell, obj in enumerate(self.cells) if obj is not None]

    def empty_cells(self) -> list[int]:
        return [cell for cell, obj in enumerate(self.cells) if obj is None]

    def replace(self, cell: int, obj: SceneObject | None) -> Scene:
        cells = list(self.cells)
        cells[cell] = obj
        return Scene(tuple(cells))

    def pairs(self) -> set[tuple[str, str]]:
        return {obj.pair() for _, obj in self.objects()}


def _object_code(obj: SceneObject) -> str:
    return f"{_SHAPE_CODE[obj.shape]}{COLOURS.index(obj.colour)}{_SIZE_CODE[obj.size]}"


def key_legend() -> str:
    """One line (markdown) saying how to read a scene key, built from the codes themselves."""
    shapes = ", ".join(f"`{code}` {shape}" for shape, code in _SHAPE_CODE.items())
    colours = ", ".join(f"`{index}` {colour}" for index, colour in enumerate(COLOURS))
    sizes = ", ".join(f"`{code}` {size}" for size, code in _SIZE_CODE.items())
    circle = SceneObject("circle", COLOURS[0], "large")
    centred = Scene(tuple(circle if cell == N_CELLS // 2 else None for cell in range(N_CELLS)))
    return (f"Ids such as `{centred.key}` name a synthetic scene: its {N_CELLS} grid cells row by row from the top left, "
            f"joined by `-`; `{_EMPTY}` is an empty cell, else shape ({shapes}), colour ({colours}) and size ({sizes}): "
            f"`{_object_code(circle)}` is a large {circle.colour} circle.")


def scene_identity(scene: Scene) -> str:
    """The scene's object identity: its objects as a multiset, layout left out (``c0S+t3L``).

    What stays one "object" in this benchmark is its content: a ``move`` edit (or any other
    scene holding the same objects elsewhere on the grid) shows the same identity from another
    view, as a person re-photographed; adding, removing or changing an object makes another one.
    """
    return "+".join(sorted(_object_code(obj) for _, obj in scene.objects())) or "empty"


_SHAPE_OF = {code: shape for shape, code in _SHAPE_CODE.items()}
_SIZE_OF = {code: size for size, code in _SIZE_CODE.items()}


def parse_scene_key(key: str) -> Scene:
    """Inverse of :attr:`Scene.key`. Raises ValueError on a name that is not a scene key."""
    parts = key.split("-")
    if len(parts) != N_CELLS:
        raise ValueError(f"{key!r} is not a synthetic scene key ({N_CELLS} cells joined by '-')")
    cells: list[SceneObject | None] = []
    for part in parts:
        if part == _EMPTY:
            cells.append(None)
            continue
        if len(part) != 3 or part[0] not in _SHAPE_OF or part[2] not in _SIZE_OF or not part[1].isdigit():
            raise ValueError(f"{key!r}: bad cell code {part!r}")
        colour = int(part[1])
        if colour >= len(COLOURS):
            raise ValueError(f"{key!r}: bad colour index in {part!r}")
        cells.append(SceneObject(_SHAPE_OF[part[0]], COLOURS[colour], _SIZE_OF[part[2]]))
    return Scene(tuple(cells))


def all_objects(*, excluded_pairs: Collection[tuple[str, str]] = ()) -> list[SceneObject]:
    """Every object whose (shape, colour) is not excluded, in a fixed order."""
    return list(_objects_without(frozenset(excluded_pairs)))


@functools.lru_cache(maxsize=32)
def _objects_without(excluded_pairs: frozenset[tuple[str, str]]) -> tuple[SceneObject, ...]:
    return tuple(
        SceneObject(shape, colour, size)
        for shape in SHAPES
        for colour in COLOURS
        for size in SIZES
        if (shape, colour) not in excluded_pairs
    )


def sample_scene(
    rng: np.random.Generator,
    *,
    max_objects: int = 5,
    excluded_pairs: Collection[tuple[str, str]] = (),
) -> Scene:
    """A scene of 1..max_objects objects in distinct cells, none with an excluded (shape, colour)."""
    pool = _objects_without(frozenset(excluded_pairs))
    count = int(rng.integers(1, max_objects + 1))
    cells = rng.permutation(N_CELLS)[:count]
    chosen: list[SceneObject | None] = [None] * N_CELLS
    for cell in cells:
        chosen[int(cell)] = pool[int(rng.integers(len(pool)))]
    return Scene(tuple(chosen))


@functools.lru_cache(maxsize=1024)
def cell_bounds(cell: int, size: int) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) pixel bounds of a grid cell in an image of side ``size``."""
    row, col = divmod(cell, GRID)
    edges = [round(i * size / GRID) for i in range(GRID + 1)]
    return edges[row], edges[col], edges[row + 1], edges[col + 1]


@functools.lru_cache(maxsize=256)
def _sprite(shape: str, size: str, height: int, width: int) -> np.ndarray:
    """Anti-aliased coverage (height, width, 1) float32 in [0, 1] of a shape centred in a cell."""
    scale = _SUPERSAMPLE
    canvas = Image.new("L", (width * scale, height * scale), 0)
    draw = ImageDraw.Draw(canvas)
    side = _EXTENT[size] * min(height, width) * scale
    cx, cy = width * scale / 2, height * scale / 2
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "square":
        inset = side * 0.1  # a square looks larger than a circle of the same extent
        draw.rectangle((box[0] + inset, box[1] + inset, box[2] - inset, box[3] - inset), fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    small = canvas.resize((width, height), Image.Resampling.BOX)
    return (np.asarray(small, dtype=np.float32) / 255.0)[:, :, None]


@functools.lru_cache(maxsize=2048)
def _cell_patch(obj: SceneObject, height: int, width: int) -> np.ndarray:
    """(height, width, 3) uint8: the object over the background. Cells never overlap, so a
    scene is the background plus one cached patch per object (this is what makes ~20k scenes/s)."""
    alpha = _sprite(obj.shape, obj.size, height, width)  # (h, w, 1)
    background = np.array(BACKGROUND, dtype=np.float32)
    patch = background + alpha * (np.array(RGB[obj.colour], dtype=np.float32) - background)
    patch = np.rint(patch).astype(np.uint8)
    patch.flags.writeable = False
    return patch


@functools.lru_cache(maxsize=64)
def _background(size: int) -> np.ndarray:
    canvas = np.empty((size, size, 3), dtype=np.uint8)
    canvas[:] = BACKGROUND
    canvas.flags.writeable = False
    return canvas


def render_scene_array(scene: Scene, *, size: int = 64) -> np.ndarray:
    """Render to a (size, size, 3) uint8 array. Deterministic: one scene, one image."""
    if size < 2 * GRID:
        raise ValueError(f"image size {size} is too small; use at least {2 * GRID}")
    image = _background(size).copy()
    for cell, obj in scene.objects():
        top, left, bottom, right = cell_bounds(cell, size)
        image[top:bottom, left:right] = _cell_patch(obj, bottom - top, right - left)
    return image


def render_scene(scene: Scene, *, size: int = 64) -> Image.Image:
    """Render a scene as an RGB PIL image of side ``size``."""
    return Image.fromarray(render_scene_array(scene, size=size), mode="RGB")


def describe_object(obj: SceneObject) -> str:
    return f"{obj.size} {obj.colour} {obj.shape}"


def scene_caption(scene: Scene) -> str:
    """A full description, e.g. ``"a small red circle at the top left and a large blue square in the center"``."""
    parts = [f"a {describe_object(obj)} {_at(cell)}" for cell, obj in scene.objects()]
    if not parts:
        return "an empty scene"
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _at(cell: int) -> str:
    name = CELL_NAMES[cell][0]
    return f"in the {name}" if name == "center" else f"at the {name}"
