"""A gallery store in a Milvus collection: Milvus Lite (an embedded file, ``*.db``) or a Milvus
server (``http://host:19530``, standalone or distributed).

Why this layout:

- **Milvus is the single source of truth.** Every item lives in the collection and nowhere else,
  so several processes (service replicas, a batch indexer) connected to one server see the same
  gallery, and a write acknowledged by Milvus is durable however the writing process ends. The
  index folder keeps only ``index.json`` (format, schema 3, the encoder fingerprint, the URI,
  collection, metric and index parameters) and ``images/`` for images uploaded at run time
  (several machines serving one gallery share it, e.g. on a network file system).
- **One row per item**: ``id`` (VARCHAR primary key: the string item id itself, so there is no
  second id mapping to keep in step), ``embed`` (FLOAT_VECTOR, the gallery vector, COSINE),
  ``features`` (FLOAT_VECTOR, the flattened ``image_features``: a reference given by id is composed
  from these, with no image encode; FLOAT_VECTOR because Milvus Lite stores no binary, float16 or
  array-of-vector field, and a server caps it at 32,768 dimensions unless its proxy.maxDimension
  is raised), ``path`` (VARCHAR) and ``added`` (INT64 nanoseconds by the writer's clock: ids are
  listed in the order they were added, as usearch does).
- **Split layout on servers older than 2.4** (one vector field per collection): ``features`` lives
  in a second collection, ``<collection>__features`` (``id`` + ``features``), which the main one
  names in its properties. An add writes the features first and the item second, a removal the
  other way round, so the main collection never lists an item without its features.
- **Writes are upserts**, so adding an id again replaces it (Milvus does not refuse a duplicate
  primary key on insert; an upsert never makes one). Reads use Strong consistency: a search sees
  every write acknowledged before it, from any process.
- **The index**: HNSW with usearch's defaults (M 16 = connectivity, efConstruction 128 =
  expansion_add, ef 256 = expansion_search, raised to k when k is larger), so both backends trade
  recall for speed the same way; ``features`` gets a FLAT index (Milvus loads only indexed
  vector fields; it is read by id, never searched).

Milvus Lite 3.x (the embedded engine the tests use) is one process per file; it builds HNSW with
faiss (IndexHNSWFlat, f32) per segment of <= 100k rows, in a background thread after a flush,
and searches rows not indexed yet exactly. Limits: a search returns at most 16,384 hits
(Milvus's top-k cap); listing ids reads every row's id. A build into an existing collection is
refused unless asked to overwrite it: ``--overwrite`` replaces the collection of ``--out``'s own
index (the collection records the folder that built it), ``--overwrite-collection NAME`` one that
another index folder uses. Dropping and refilling is not atomic (an index folder that named the
dropped collection sees the new one, or refuses it if another encoder filled it); a build that
fails drops the collection it created.

Writers of one server collection (several processes, Ray Serve replicas) share no lock: an add that
must not replace (HTTP 409 on an id already there) claims its ids first, as
:mod:`compir.runtime.milvus_claims` explains (a Milvus Lite file has one process: it needs none).
Filters are built by :mod:`compir.runtime.milvus_client`
only, so an id is always a string literal, never expression syntax; that module also turns a
server that is down or restarting into a 503 (UnavailableError) that clears once it is back.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compir.contracts import INDEX_FILE
from compir.errors import CompirError, ContractError, InputError
from compir.manifest import EncoderFingerprint
from compir.runtime.index import HnswConfig
from compir.runtime.milvus_claims import Claims
from compir.runtime.milvus_client import NAME, after_filter, call, connect, in_filter, is_server, server_version
from compir.runtime.store import IMAGES_DIR, unknown_item
from compir.runtime.uploads import MAX_ID_CHARS

__all__ = ["DEFAULT_COLLECTION", "MAX_PATH_CHARS", "MilvusConfig", "MilvusStore", "in_filter"]

MILVUS_SCHEMA = 3  # of index.json: a Milvus-backed index (older compir versions refuse it, naming the version)
DEFAULT_COLLECTION = "compir_gallery"
MAX_PATH_CHARS = 4096
MAX_TOPK = 16_384  # Milvus's limit on one search's k: a larger k is clamped to it
_UPSERT_BYTES = 32 << 20  # per request, under gRPC's 64 MiB message limit
_PAGE = 4096  # ids per request when listing them
_ENCODER_PROPERTY = "compir.encoder"  # collection property: the fingerprint digest of the encoder that filled it
_INDEX_DIR_PROPERTY = "compir.index_dir"  # collection property: the index folder (absolute) whose build created it
_FEATURES_PROPERTY = "compir.features_collection"  # collection property: where its features are (split layout only)
_FEATURES_OF_PROPERTY = "compir.features_of"  # the features collection's property: the collection it belongs to
_SPLIT_BELOW = (2, 4)  # servers older than this hold one vector field per collection


@dataclass(frozen=True)
class MilvusConfig:
    """Where the collection is and how its vectors are indexed."""

    uri: str
    collection: str = DEFAULT_COLLECTION
    index_type: str = "HNSW"
    index_params: dict[str, Any] = field(default_factory=lambda: {"M": 16, "efConstruction": 128})
    search_params: dict[str, Any] = field(default_factory=lambda: {"ef": 256})

    @classmethod
    def from_hnsw(cls, uri: str, *, collection: str = DEFAULT_COLLECTION, hnsw: HnswConfig = HnswConfig()) -> MilvusConfig:
        """An HNSW collection with the same graph settings as a usearch index built with ``hnsw``."""
        return cls(uri=uri, collection=collection, index_params={"M": hnsw.connectivity, "efConstruction": hnsw.expansion_add},
                   search_params={"ef": hnsw.expansion_search})

    def resolved(self) -> MilvusConfig:
        """Checked, with a Milvus Lite file made absolute (index.json then opens from any directory)."""
        if not NAME.fullmatch(self.collection):
            raise InputError(f"Milvus collection name {self.collection!r}: use letters, digits and _, not starting with a digit")
        if "://" in self.uri:
            return self
        if not self.uri.endswith(".db"):
            raise InputError(f"--milvus-uri {self.uri!r}: give a Milvus Lite file ending in .db or a server URI like http://host:19530")
        return MilvusConfig(str(Path(self.uri).expanduser().resolve()), self.collection, self.index_type,
                            dict(self.index_params), dict(self.search_params))

    def record(self) -> dict[str, Any]:
        return {"uri": self.uri, "collection": self.collection, "metric_type": "COSINE", "index_type": self.index_type,
                "index_params": self.index_params, "search_params": self.search_params}


class MilvusStore:
    """Gallery items in one Milvus collection (see the module docstring)."""

    backend = "milvus"
    schema_version = MILVUS_SCHEMA

    def __init__(self, config: MilvusConfig, *, ndim: int, feature_shape: tuple[int, ...], client: Any,
                 features_collection: str | None = None) -> None:
        self.config = config
        self.ndim = ndim
        self.feature_shape = tuple(feature_shape)
        self._client = client
        self._features = features_collection or config.collection  # where the ``features`` field is
        self._dropped_paths: set[str] = set()  # images of removed or replaced items, deleted at commit if unused
        self._claims = Claims(client, uri=config.uri, gallery=config.collection) if is_server(config.uri) else None

    # ---- opening ----------------------------------------------------------------------------
    @classmethod
    def create(cls, config: MilvusConfig, *, ndim: int, feature_shape: tuple[int, ...], encoder: EncoderFingerprint,
               index_dir: Path | None = None, overwrite: bool = False, overwrite_collection: str | None = None) -> MilvusStore:
        """A new, empty collection for the index folder ``index_dir`` (recorded in the collection, if given).
        One of the same name is dropped first with ``overwrite`` when no other index folder uses it
        (without ``index_dir``: whoever uses it), or when ``overwrite_collection`` names it."""
        config = config.resolved()
        client = connect(config.uri)
        name = config.collection
        if call(client.has_collection, name, what=f"look up collection {name!r}", uri=config.uri):
            if not overwrite and overwrite_collection != name:
                raise InputError(f"Milvus collection {name!r} already exists at {config.uri}; "
                                 "pass --overwrite to replace it, or choose another --collection")
            described = call(client.describe_collection, name, what=f"describe collection {name!r}", uri=config.uri)
            user = _other_user(described, config, index_dir) if index_dir is not None else None
            if user is not None and overwrite_collection != name:
                raise InputError(f"Milvus collection {name!r} at {config.uri} is used by {user}; --overwrite replaces only the "
                                 f"collection of --out's own index: pass --overwrite-collection {name} to replace it anyway "
                                 "(that index then sees the new items), or choose another --collection")
            _drop(client, config.uri, name)
        claims = Claims(client, uri=config.uri, gallery=name) if is_server(config.uri) else None
        if claims is not None:
            claims.drop()  # a dropped gallery's claims are void
        split = is_server(config.uri) and server_version(client, config.uri) < _SPLIT_BELOW
        features = f"{name}__features" if split else None
        properties = {_ENCODER_PROPERTY: encoder.digest, **({_INDEX_DIR_PROPERTY: str(index_dir)} if index_dir else {})}
        if features is not None:
            _drop(client, config.uri, features, owner=name)  # left by a build that died before creating ``name``
            _create(client, config.uri, features, vectors={"features": (math.prod(feature_shape), "FLAT", "L2", {})},
                    properties={_FEATURES_OF_PROPERTY: name})
            properties[_FEATURES_PROPERTY] = features
        vectors = {"embed": (ndim, config.index_type, "COSINE", config.index_params)}
        if features is None:
            vectors["features"] = (math.prod(feature_shape), "FLAT", "L2", {})
        _create(client, config.uri, name, vectors=vectors, properties=properties, rows=True)
        if claims is not None:
            claims.ensure()
        return cls(config, ndim=ndim, feature_shape=feature_shape, client=client, features_collection=features)

    def discard(self) -> None:
        """Drop the collection (a build that failed): best effort, the build's own error is the one to report."""
        try:
            _drop(self._client, self.config.uri, self.config.collection)
            if self._features != self.config.collection:
                _drop(self._client, self.config.uri, self._features, owner=self.config.collection)
            if self._claims is not None:
                self._claims.drop()
        except CompirError as exc:
            print(f"compir: warning: {exc}; drop it before retrying, or retry with --overwrite", file=sys.stderr)

    @classmethod
    def open(cls, record: dict[str, Any], *, encoder: EncoderFingerprint | None, source: str) -> MilvusStore:
        """The store an index.json ``record`` (already checked) describes; ContractError if Milvus is
        unreachable or the collection is missing or was rebuilt with another encoder or shape."""
        try:
            milvus = record["milvus"]
            config = MilvusConfig(uri=str(milvus["uri"]), collection=str(milvus["collection"]), index_type=str(milvus["index_type"]),
                                  index_params=dict(milvus["index_params"]), search_params=dict(milvus["search_params"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ContractError(f"{source}: the milvus section is incomplete ({exc!r}); rebuild the index") from exc
        ndim, feature_shape = int(record["embed_dim"]), tuple(int(x) for x in record["feature_shape"])
        if not is_server(config.uri) and not Path(config.uri).exists():  # connecting would create an empty one
            raise ContractError(f"{source}: its Milvus Lite file {config.uri} does not exist (moved or deleted?); rebuild the "
                                "index with `compir index build ... --milvus-uri FILE.db`, or put the file back")
        client = connect(config.uri)
        name = config.collection
        described = _described(client, config.uri, name, source=source)
        features = described.get("properties", {}).get(_FEATURES_PROPERTY)
        dims = _dims(described) | (_dims(_described(client, config.uri, features, source=source)) if features else {})
        if dims.get("embed") != ndim or dims.get("features") != math.prod(feature_shape):
            raise ContractError(f"{source}: collection {name!r} at {config.uri} holds vectors of {dims.get('embed')} and "
                                f"{dims.get('features')} dims, index.json says {ndim} and {math.prod(feature_shape)}; rebuild the index")
        if encoder is not None and described.get("properties", {}).get(_ENCODER_PROPERTY) != encoder.digest:
            raise ContractError(f"{source}: collection {name!r} at {config.uri} was rebuilt with another encoder since this "
                                "index.json was written; rebuild the index for this export")
        for loaded in (name, features) if features else (name,):
            call(client.load_collection, loaded, what=f"load collection {loaded!r}", uri=config.uri)
        return cls(config, ndim=ndim, feature_shape=feature_shape, client=client, features_collection=features)

    # ---- lookup ----------------------------------------------------------------------------
    def count(self) -> int:
        rows = self._query(filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def contains(self, item_id: str) -> bool:
        return bool(self.present([item_id]))

    def present(self, ids: Sequence[str]) -> set[str]:
        return {str(row["id"]) for row in self._query_in("id", ids, output_fields=["id"])}

    def item_ids(self) -> list[str]:
        # Pages in primary-key order ("iterator" asks the server for it), each after the last id seen.
        rows: list[tuple[int, str]] = []
        while page := self._query(filter=after_filter("id", rows[-1][1]) if rows else "", output_fields=["id", "added"],
                                  limit=_PAGE, iterator="True", reduce_stop_for_best="True"):
            rows.extend((int(row["added"]), str(row["id"])) for row in page)
        return [item for _, item in sorted(rows)]

    def features_of(self, ids: Sequence[str]) -> np.ndarray:
        found = self._by_id(ids, "features")
        return np.asarray([found[item] for item in ids], dtype=np.float32).reshape(len(ids), *self.feature_shape)

    def paths_of(self, ids: Sequence[str]) -> list[str]:
        found = self._by_id(ids, "path")
        return [str(found[item]) for item in ids]

    def search(self, queries: np.ndarray, *, k: int) -> list[list[tuple[str, float]]]:
        limit = min(int(k), MAX_TOPK)
        params = {**self.config.search_params}
        if "ef" in params:
            params["ef"] = max(int(params["ef"]), limit)  # HNSW needs ef >= k
        found = call(self._client.search, self.config.collection, data=np.asarray(queries, dtype=np.float32).tolist(),
                     anns_field="embed", limit=limit, output_fields=[], search_params={"metric_type": "COSINE", "params": params},
                     consistency_level="Strong", what="search", uri=self.config.uri)
        return [[(str(hit["id"]), float(hit["distance"])) for hit in hits] for hits in found]

    def describe(self) -> dict[str, Any]:
        return {"index_backend": "milvus", "milvus_uri": self.config.uri, "milvus_collection": self.config.collection,
                "milvus_index": self.config.index_type}

    # ---- mutation ----------------------------------------------------------------------------
    @contextmanager
    def claim(self, ids: Sequence[str]) -> Iterator[None]:
        """Hold ``ids`` against other writers' adds of them while this add checks and writes them
        (a server: :mod:`compir.runtime.milvus_claims`; a Milvus Lite file has no other writer)."""
        with self._claims.hold(ids) if self._claims is not None else nullcontext():
            yield

    def add(self, ids: Sequence[str], *, embeds: np.ndarray, features: np.ndarray, paths: Sequence[str],
            added: Sequence[int] | None = None) -> None:
        """Upsert in requests of <= 32 MiB. Split layout: each request's features first, so an item
        is never listed (or found) without its features; a crash between the two leaves only an
        unlisted features row, replaced by the next add of that id. ``added``: each item's ``added``
        (what orders the ids), for writers that add in parallel (Ray Data's build: its start time +
        the file's row); by default this clock's now, in the order given."""
        replaced = self._query_in("id", ids, output_fields=["path"])
        flat = np.asarray(features, dtype=np.float32).reshape(len(ids), -1)
        vectors = np.asarray(embeds, dtype=np.float32)
        base = time.time_ns()
        stamps = [base + i for i in range(len(ids))] if added is None else [int(stamp) for stamp in added]
        per_request = max(1, _UPSERT_BYTES // (4 * (vectors.shape[1] + flat.shape[1])))
        for start in range(0, len(ids), per_request):
            chunk = range(start, min(start + per_request, len(ids)))
            rows = [{"id": ids[i], "embed": vectors[i].tolist(), "path": paths[i], "added": stamps[i]} for i in chunk]
            feature_rows = [{"id": ids[i], "features": flat[i].tolist()} for i in chunk]
            try:
                if self._features == self.config.collection:
                    rows = [{**row, **feature_row} for row, feature_row in zip(rows, feature_rows, strict=True)]
                else:
                    call(self._client.upsert, self._features, feature_rows, what=f"insert {len(rows)} features", uri=self.config.uri)
                call(self._client.upsert, self.config.collection, rows, what=f"insert {len(rows)} items", uri=self.config.uri)
            except ContractError as exc:
                done = f"the first {start} of {len(ids)} were added" if start else "none was added"
                raise ContractError(f"{exc}; {done}") from exc
        self._dropped_paths.update(str(row["path"]) for row in replaced)

    def remove(self, ids: Sequence[str]) -> int:
        present = self._query_in("id", ids, output_fields=["id", "path"])
        if present:
            where = in_filter("id", [str(row["id"]) for row in present])
            for collection in dict.fromkeys([self.config.collection, self._features]):  # the item first, then its features
                call(self._client.delete, collection, filter=where, what=f"delete {len(present)} items", uri=self.config.uri)
            self._dropped_paths.update(str(row["path"]) for row in present)
        return len(present)

    # ---- persistence ---------------------------------------------------------------------------
    def commit(self, folder: Path) -> dict[str, Any]:
        # An acknowledged write is already in Milvus's write-ahead log. A server seals segments (and
        # builds their index) itself and rate-limits flushes; Milvus Lite builds its graphs on flush.
        if not is_server(self.config.uri):
            call(self._client.flush, self.config.collection, what="flush", uri=self.config.uri)
        return {"backend": self.backend, "milvus": self.config.record()}

    def committed(self, folder: Path) -> None:
        """Delete uploaded images that no item refers to any more (only those this process dropped)."""
        uploads = sorted(path for path in self._dropped_paths if path.startswith(f"{IMAGES_DIR}/"))
        self._dropped_paths.clear()
        if not uploads:
            return
        still = {str(row["path"]) for row in self._query_in("path", uploads, output_fields=["path"])}
        for path in uploads:
            if path not in still:
                (folder / path).unlink(missing_ok=True)

    # ---- internals ---------------------------------------------------------------------------
    def _query(self, *, filter: str, output_fields: list[str], collection: str | None = None, **options: Any) -> list[dict[str, Any]]:
        return list(call(self._client.query, collection or self.config.collection, filter=filter, output_fields=output_fields,
                         consistency_level="Strong", what="query", uri=self.config.uri, **options))

    def _query_in(self, column: str, values: Sequence[str], *, output_fields: list[str],
                  collection: str | None = None) -> list[dict[str, Any]]:
        """Rows whose ``column`` is one of ``values`` (never pymilvus's ``ids=``: it quotes ids unescaped)."""
        unique = list(dict.fromkeys(values))
        return self._query(filter=in_filter(column, unique), output_fields=output_fields, collection=collection) if unique else []

    def _by_id(self, ids: Sequence[str], column: str) -> dict[str, Any]:
        collection = self._features if column == "features" else self.config.collection
        found = {str(row["id"]): row[column] for row in self._query_in("id", ids, output_fields=["id", column], collection=collection)}
        missing = [item for item in ids if item not in found]
        if missing:
            raise unknown_item(missing[0], self.count())
        return found


def _create(client: Any, uri: str, name: str, *, vectors: dict[str, tuple[int, str, str, dict[str, Any]]],
            properties: dict[str, str], rows: bool = False) -> None:
    """Collection ``name``: the VARCHAR id, ``vectors`` (field: dim, index type, metric, index
    parameters) and, with ``rows``, an item's ``path`` and ``added``."""
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=4 * MAX_ID_CHARS)  # bytes: 4 per UTF-8 char
    index = client.prepare_index_params()
    for field_name, (dim, index_type, metric, params) in vectors.items():
        schema.add_field(field_name, DataType.FLOAT_VECTOR, dim=dim)
        index.add_index(field_name=field_name, index_type=index_type, metric_type=metric, params=params)
    if rows:
        schema.add_field("path", DataType.VARCHAR, max_length=MAX_PATH_CHARS)
        schema.add_field("added", DataType.INT64)
    call(client.create_collection, name, schema=schema, index_params=index, consistency_level="Strong", properties=properties,
         what=f"create collection {name!r}", uri=uri)


def _drop(client: Any, uri: str, name: str, *, owner: str | None = None) -> None:
    """Drop collection ``name`` if it exists (with ``owner``: only if it holds ``owner``'s features)."""
    if not call(client.has_collection, name, what=f"look up collection {name!r}", uri=uri):
        return
    if owner is not None:
        properties = call(client.describe_collection, name, what=f"describe collection {name!r}", uri=uri).get("properties", {})
        if properties.get(_FEATURES_OF_PROPERTY) != owner:
            raise InputError(f"Milvus collection {name!r} at {uri} is not compir's features of {owner!r}; "
                             "choose another --collection")
    call(client.drop_collection, name, what=f"drop collection {name!r}", uri=uri)


def _described(client: Any, uri: str, name: str, *, source: str) -> dict[str, Any]:
    if not call(client.has_collection, name, what=f"look up collection {name!r}", uri=uri):
        raise ContractError(f"{source}: Milvus at {uri} has no collection {name!r} (dropped?); "
                            "rebuild it with `compir index build ... --index-backend milvus`")
    return dict(call(client.describe_collection, name, what=f"describe collection {name!r}", uri=uri))


def _dims(described: dict[str, Any]) -> dict[str, int]:
    return {f["name"]: int(f.get("params", {}).get("dim", 0)) for f in described["fields"] if "dim" in f.get("params", {})}


def _other_user(described: dict[str, Any], config: MilvusConfig, index_dir: Path) -> str | None:
    """The index folder other than ``index_dir`` that uses this collection (its index.json names it),
    or None where none does (the recorded folder is ``index_dir``, or gone, or names another)."""
    recorded = described.get("properties", {}).get(_INDEX_DIR_PROPERTY)
    if recorded is None:
        return "an index folder this compir did not record (built by an older compir or another tool)"
    if recorded == str(index_dir):
        return None
    try:
        milvus = json.loads((Path(recorded) / INDEX_FILE).read_text(encoding="utf-8")).get("milvus", {})
    except (OSError, ValueError, AttributeError):
        return None
    names_it = isinstance(milvus, dict) and milvus.get("uri") == config.uri and milvus.get("collection") == config.collection
    return f"index folder {recorded}" if names_it else None
