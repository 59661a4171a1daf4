"""Which images show one object: MMRef's identities, from the dataset or derived from what it has.

No CIR dataset labels object identity, so ``--identities`` chooses where they come from:

- ``dataset``: the dataset's own labels (``CirSplit.identities``); the synthetic benchmark writes them
  (``captions/identity.<split>.json``: the same objects up to layout, see
  :func:`compir.data.synth_scene.scene_identity`);
- ``scenes``: the same, only accepted on the synthetic benchmark;
- ``clusters``: spherical k-means of the training gallery's image vectors (the checkpoint's own
  features), about ``cluster_size`` images each; a cluster left with one image joins its nearest;
- ``img_set``: CIRR's ``img_set`` groups (six similar photos, not one object: a coarse proxy);
- ``auto``: ``dataset`` where the data has labels, else ``clusters``.

With one image per identity the references only gather an image with its own texts and queries:
:func:`describe` says so in a line of its own.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from compir.data.types import CirSplit
from compir.errors import InputError

IDENTITY_SOURCES = ("auto", "dataset", "scenes", "clusters", "img_set")
CLUSTER_SIZE = 4
_KMEANS_ROUNDS = 25


@dataclass(frozen=True)
class IdentityAssignment:
    """``of[name]`` is the identity of image ``name`` (every image given, none left out)."""

    source: str  # what ran: dataset / scenes / clusters / img_set
    of: dict[str, str]

    def images_per_identity(self) -> dict[int, int]:
        """Histogram: images per identity -> how many identities have that many."""
        return dict(sorted(Counter(Counter(self.of.values()).values()).items()))

    def degenerate(self) -> bool:
        return all(size == 1 for size in self.images_per_identity())


def assign_identities(
    split: CirSplit, *, source: str, images: list[str], image_embeds: np.ndarray | None = None,
    cluster_size: int = CLUSTER_SIZE, seed: int = 0,
) -> IdentityAssignment:
    """Identities of ``images`` (rows of ``image_embeds``, (N, D) unit vectors, for ``clusters``)."""
    if source not in IDENTITY_SOURCES:
        raise InputError(f"--identities must be one of {', '.join(IDENTITY_SOURCES)}, got {source!r}")
    if source == "auto":
        source = ("scenes" if split.protocol == "synthetic" else "dataset") if split.identities else "clusters"
    if source == "scenes" and split.protocol != "synthetic":
        raise InputError(f"--identities scenes needs compir's synthetic benchmark; {split.root} is {split.protocol!r} data "
                         "(use clusters or img_set)")
    if source in ("dataset", "scenes"):
        if not split.identities:
            raise InputError(f"--identities {source}: split {split.name!r} under {split.root} labels no identities (use clusters)")
        return IdentityAssignment(source, {name: split.identities.get(name, name) for name in images})
    if source == "img_set":
        return IdentityAssignment(source, _img_set_groups(split, images))
    if image_embeds is None or len(image_embeds) != len(images):
        raise InputError("--identities clusters needs the image vectors of every training image")
    labels = cluster_vectors(image_embeds, count=max(1, len(images) // max(1, cluster_size)), seed=seed)
    return IdentityAssignment(source, {name: f"cluster{label}" for name, label in zip(images, labels, strict=True)})


def describe(assignment: IdentityAssignment) -> str:
    """One line (two when degenerate): identities, images, and how many images each has."""
    sizes = assignment.images_per_identity()
    shown = ", ".join(f"{size}: {count}" for size, count in sizes.items())
    line = (f"mmref: identities from {assignment.source}: {sum(sizes.values())} over {len(assignment.of)} images "
            f"(images per identity -> identities: {shown})")
    if assignment.degenerate():
        line += ("\nmmref: every identity holds ONE image: a reference only gathers that image with its own captions and "
                 "queries, so MMRef degenerates to per-image prototypes (try --identities clusters)")
    return line


def cluster_vectors(vectors: np.ndarray, *, count: int, seed: int = 0) -> np.ndarray:
    """Spherical k-means of (N, D) unit vectors into ``count`` clusters -> (N,) labels, every
    cluster of at least two vectors (a singleton joins the nearest larger cluster) when N >= 2."""
    rng = np.random.default_rng(seed)
    count = max(1, min(count, len(vectors)))
    centres = vectors[rng.choice(len(vectors), size=count, replace=False)]
    labels = np.zeros(len(vectors), dtype=np.int64)
    for _ in range(_KMEANS_ROUNDS):
        labels = (vectors @ centres.T).argmax(axis=1)  # (N,)
        sums = np.zeros_like(centres)
        np.add.at(sums, labels, vectors)
        filled = np.bincount(labels, minlength=count) > 0
        centres[filled] = sums[filled] / np.maximum(np.linalg.norm(sums[filled], axis=1, keepdims=True), 1e-12)
    while len(vectors) >= 2:
        sizes = np.bincount(labels, minlength=count)
        lonely = np.flatnonzero(sizes == 1)
        if len(lonely) == 0:
            break
        row = int(np.flatnonzero(labels == lonely[0])[0])
        similarity = vectors[row] @ centres.T  # (count,)
        similarity[sizes < 2] = -np.inf  # join a cluster that already holds two or more
        if not np.isfinite(similarity).any():  # only singletons left: pair with the nearest other one
            similarity = vectors[row] @ centres.T
            similarity[lonely[0]] = -np.inf
        labels[row] = int(similarity.argmax())
    return np.unique(labels, return_inverse=True)[1]


def _img_set_groups(split: CirSplit, images: list[str]) -> dict[str, str]:
    """CIRR's ``img_set`` members as groups; an image in several sets keeps the first."""
    group: dict[str, str] = {}
    for query in split.queries:
        if query.subset:
            name = f"set:{query.subset[0]}"
            for member in query.subset:
                group.setdefault(member, name)
    if not group:
        raise InputError(f"--identities img_set: split {split.name!r} has no img_set groups (CIRR and the synthetic benchmark have them)")
    return {name: group.get(name, name) for name in images}
