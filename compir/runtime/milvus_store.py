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
fails drops the collection it created. Filters are built by :func:`in_filter` only, so an id is
always a string literal, never expression syntax.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compir.contracts import INDEX_FILE
from compir.errors import ContractError, InputError
from compir.manifest import EncoderFingerprint
from compir.runtime.index import HnswConfig
from compir.runtime.store import IMAGES_DIR, unknown_item
from compir.runtime.uploads import MAX_ID_CHARS
from compir.runtime.writer_lock import lite_lock_holder

MILVUS_SCHEMA = 3  # of index.json: a Milvus-backed index (older compir versions refuse it, naming the version)
DEFAULT_COLLECTION = "compir_gallery"
MAX_PATH_CHARS = 4096
MAX_TOPK = 16_384  # Milvus's limit on one search's k: a larger k is clamped to it
_UPSERT_BYTES = 32 << 20  # per request, under gRPC's 64 MiB message limit
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"})  # in a "..." filter literal
_ENCODER_PROPERTY = "compir.encoder"  # collection property: the fingerprint digest of the encoder that filled it
_INDEX_DIR_PROPERTY = "compir.index_dir"  # collection property: the index folder (absolute) whose build created it
_CLIENTS: dict[str, Any] = {}  # one client per URI and process (Milvus Lite allows one opener per file)
_CLIENTS_LOCK = threading.Lock()


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
        if not _NAME.fullmatch(self.collection):
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

    def __init__(self, config: MilvusConfig, *, ndim: int, feature_shape: tuple[int, ...], client: Any) -> None:
        self.config = config
        self.ndim = ndim
        self.feature_shape = tuple(feature_shape)
        self._client = client
        self._dropped_paths: set[str] = set()  # images of removed or replaced items, deleted at commit if unused

    # ---- opening ----------------------------------------------------------------------------
    @classmethod
    def create(cls, config: MilvusConfig, *, ndim: int, feature_shape: tuple[int, ...], encoder: EncoderFingerprint,
               index_dir: Path | None = None, overwrite: bool = False, overwrite_collection: str | None = None) -> MilvusStore:
        """A new, empty collection for the index folder ``index_dir`` (recorded in the collection, if given).
        One of the same name is dropped first with ``overwrite`` when no other index folder uses it
        (without ``index_dir``: whoever uses it), or when ``overwrite_collection`` names it."""
        config = config.resolved()
        client = _connect(config.uri)
        name = config.collection
        if _call(client.has_collection, name, what=f"look up collection {name!r}", uri=config.uri):
            if not overwrite and overwrite_collection != name:
                raise InputError(f"Milvus collection {name!r} already exists at {config.uri}; "
                                 "pass --overwrite to replace it, or choose another --collection")
            described = _call(client.describe_collection, name, what=f"describe collection {name!r}", uri=config.uri)
            user = _other_user(described, config, index_dir) if index_dir is not None else None
            if user is not None and overwrite_collection != name:
                raise InputError(f"Milvus collection {name!r} at {config.uri} is used by {user}; --overwrite replaces only the "
                                 f"collection of --out's own index: pass --overwrite-collection {name} to replace it anyway "
                                 "(that index then sees the new items), or choose another --collection")
            _call(client.drop_collection, name, what=f"drop collection {name!r}", uri=config.uri)
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=4 * MAX_ID_CHARS)  # bytes: 4 per UTF-8 char
        schema.add_field("embed", DataType.FLOAT_VECTOR, dim=ndim)
        schema.add_field("features", DataType.FLOAT_VECTOR, dim=math.prod(feature_shape))
        schema.add_field("path", DataType.VARCHAR, max_length=MAX_PATH_CHARS)
        schema.add_field("added", DataType.INT64)
        index = client.prepare_index_params()
        index.add_index(field_name="embed", index_type=config.index_type, metric_type="COSINE", params=config.index_params)
        index.add_index(field_name="features", index_type="FLAT", metric_type="L2")
        _call(client.create_collection, name, schema=schema, index_params=index, consistency_level="Strong",
              properties={_ENCODER_PROPERTY: encoder.digest, **({_INDEX_DIR_PROPERTY: str(index_dir)} if index_dir else {})},
              what=f"create collection {name!r}", uri=config.uri)
        return cls(config, ndim=ndim, feature_shape=feature_shape, client=client)

    def discard(self) -> None:
        """Drop the collection (a build that failed): best effort, the build's own error is the one to report."""
        try:
            _call(self._client.drop_collection, self.config.collection, what="drop a failed build's collection", uri=self.config.uri)
        except ContractError as exc:
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
        if "://" not in config.uri and not Path(config.uri).exists():  # connecting would create an empty one
            raise ContractError(f"{source}: its Milvus Lite file {config.uri} does not exist (moved or deleted?); rebuild the "
                                "index with `compir index build ... --milvus-uri FILE.db`, or put the file back")
        client = _connect(config.uri)
        name = config.collection
        if not _call(client.has_collection, name, what=f"look up collection {name!r}", uri=config.uri):
            raise ContractError(f"{source}: Milvus at {config.uri} has no collection {name!r} (dropped?); "
                                "rebuild it with `compir index build ... --index-backend milvus`")
        described = _call(client.describe_collection, name, what=f"describe collection {name!r}", uri=config.uri)
        dims = {f["name"]: int(f.get("params", {}).get("dim", 0)) for f in described["fields"]}
        if dims.get("embed") != ndim or dims.get("features") != math.prod(feature_shape):
            raise ContractError(f"{source}: collection {name!r} at {config.uri} holds vectors of {dims.get('embed')} and "
                                f"{dims.get('features')} dims, index.json says {ndim} and {math.prod(feature_shape)}; rebuild the index")
        if encoder is not None and described.get("properties", {}).get(_ENCODER_PROPERTY) != encoder.digest:
            raise ContractError(f"{source}: collection {name!r} at {config.uri} was rebuilt with another encoder since this "
                                "index.json was written; rebuild the index for this export")
        _call(client.load_collection, name, what=f"load collection {name!r}", uri=config.uri)
        return cls(config, ndim=ndim, feature_shape=feature_shape, client=client)

    # ---- lookup ----------------------------------------------------------------------------
    def count(self) -> int:
        rows = self._query(filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def contains(self, item_id: str) -> bool:
        return bool(self.present([item_id]))

    def present(self, ids: Sequence[str]) -> set[str]:
        return {str(row["id"]) for row in self._query_in("id", ids, output_fields=["id"])}

    def item_ids(self) -> list[str]:
        iterator = _call(self._client.query_iterator, self.config.collection, batch_size=4096, output_fields=["id", "added"],
                         what="list item ids", uri=self.config.uri)
        rows: list[tuple[int, str]] = []
        try:
            while batch := iterator.next():
                rows.extend((int(row["added"]), str(row["id"])) for row in batch)
        finally:
            iterator.close()
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
        found = _call(self._client.search, self.config.collection, data=np.asarray(queries, dtype=np.float32).tolist(),
                      anns_field="embed", limit=limit, output_fields=[], search_params={"metric_type": "COSINE", "params": params},
                      consistency_level="Strong", what="search", uri=self.config.uri)
        return [[(str(hit["id"]), float(hit["distance"])) for hit in hits] for hits in found]

    def describe(self) -> dict[str, Any]:
        return {"index_backend": "milvus", "milvus_uri": self.config.uri, "milvus_collection": self.config.collection,
                "milvus_index": self.config.index_type}

    # ---- mutation ----------------------------------------------------------------------------
    def add(self, ids: Sequence[str], *, embeds: np.ndarray, features: np.ndarray, paths: Sequence[str]) -> None:
        replaced = self._query_in("id", ids, output_fields=["path"])
        flat = np.asarray(features, dtype=np.float32).reshape(len(ids), -1)
        vectors = np.asarray(embeds, dtype=np.float32)
        base = time.time_ns()
        per_request = max(1, _UPSERT_BYTES // (4 * (vectors.shape[1] + flat.shape[1])))
        for start in range(0, len(ids), per_request):
            rows = [{"id": ids[i], "embed": vectors[i].tolist(), "features": flat[i].tolist(), "path": paths[i], "added": base + i}
                    for i in range(start, min(start + per_request, len(ids)))]
            try:
                _call(self._client.upsert, self.config.collection, rows, what=f"insert {len(rows)} items", uri=self.config.uri)
            except ContractError as exc:
                done = f"the first {start} of {len(ids)} were added" if start else "none was added"
                raise ContractError(f"{exc}; {done}") from exc
        self._dropped_paths.update(str(row["path"]) for row in replaced)

    def remove(self, ids: Sequence[str]) -> int:
        present = self._query_in("id", ids, output_fields=["id", "path"])
        if present:
            _call(self._client.delete, self.config.collection, filter=in_filter("id", [str(row["id"]) for row in present]),
                  what=f"delete {len(present)} items", uri=self.config.uri)
            self._dropped_paths.update(str(row["path"]) for row in present)
        return len(present)

    # ---- persistence ---------------------------------------------------------------------------
    def commit(self, folder: Path) -> dict[str, Any]:
        # An acknowledged write is already in Milvus's write-ahead log. A server seals segments (and
        # builds their index) itself and rate-limits flushes; Milvus Lite builds its graphs on flush.
        if "://" not in self.config.uri:
            _call(self._client.flush, self.config.collection, what="flush", uri=self.config.uri)
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
    def _query(self, *, filter: str, output_fields: list[str]) -> list[dict[str, Any]]:
        return list(_call(self._client.query, self.config.collection, filter=filter, output_fields=output_fields,
                          consistency_level="Strong", what="query", uri=self.config.uri))

    def _query_in(self, column: str, values: Sequence[str], *, output_fields: list[str]) -> list[dict[str, Any]]:
        """Rows whose ``column`` is one of ``values`` (never pymilvus's ``ids=``: it quotes ids unescaped)."""
        unique = list(dict.fromkeys(values))
        return self._query(filter=in_filter(column, unique), output_fields=output_fields) if unique else []

    def _by_id(self, ids: Sequence[str], column: str) -> dict[str, Any]:
        found = {str(row["id"]): row[column] for row in self._query_in("id", ids, output_fields=["id", column])}
        missing = [item for item in ids if item not in found]
        if missing:
            raise unknown_item(missing[0], self.count())
        return found


def in_filter(column: str, values: Sequence[str]) -> str:
    """The filter ``column in ["v1", "v2", ...]``: every filter on a string column is built here, so
    no value (an item id, an image path) ever becomes expression syntax.

    Each value is a double-quoted literal escaped for both grammars compir meets: a Milvus server
    (Plan.g4's C-style escapes, then Go's ``strconv.Unquote``) and Milvus Lite 3 (its own lexer,
    which knows only the escapes of backslash, both quotes, n, r and t). So backslash, the double
    quote, CR, LF and tab are escaped (a raw CR or LF ends a literal in both) and every other
    character, the single quote included, stands for itself. Filter templates (``filter_params``)
    would avoid escaping on a server, but Milvus Lite ignores them.
    """
    if not _NAME.fullmatch(column):
        raise ValueError(f"not a column name: {column!r}")
    return f"{column} in [{', '.join(_string_literal(value) for value in values)}]"


def _string_literal(value: str) -> str:
    return '"' + value.translate(_ESCAPES) + '"'



def _connect(uri: str) -> Any:
    """A MilvusClient for ``uri``, shared within the process; ContractError when it cannot connect."""
    try:
        from pymilvus import MilvusClient
    except ImportError as exc:
        raise ContractError("the Milvus index backend needs pymilvus and milvus-lite: pip install 'compir[milvus]'") from exc
    # pymilvus and Milvus Lite log every failure with a traceback; compir raises its own error naming it.
    for name in ("pymilvus", "milvus_lite"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger("faiss").setLevel(logging.WARNING)  # Milvus Lite's HNSW: 4 INFO lines on which CPU build it loads
    with _CLIENTS_LOCK:
        if uri not in _CLIENTS:
            try:
                _CLIENTS[uri] = MilvusClient(uri=uri, timeout=30)
            except Exception as exc:  # pymilvus raises MilvusException or its subclasses, and grpc errors
                holder = lite_lock_holder(Path(uri)) if "://" not in uri else None
                if holder is not None:
                    raise ContractError(f"another process ({holder}) holds the Milvus Lite file {uri}: Milvus Lite serves one "
                                        "process per file; stop that one, or share one gallery between processes through a "
                                        "Milvus server (--milvus-uri http://host:19530)") from exc
                raise ContractError(f"cannot open Milvus at {uri}: {_reason(exc)}; start the server, or check the URI / "
                                    "the Milvus Lite file's folder") from exc
        return _CLIENTS[uri]


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


def _call(method: Any, *args: Any, what: str, uri: str, **kwargs: Any) -> Any:
    """``method(*args, **kwargs)`` with any Milvus failure turned into a ContractError naming ``what``."""
    try:
        return method(*args, **kwargs)
    except Exception as exc:  # MilvusException, grpc.RpcError, ConnectionError: all mean the same to the caller
        raise ContractError(f"Milvus at {uri} failed to {what}: {_reason(exc)}") from exc


def _reason(exc: Exception) -> str:
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return str(message).splitlines()[0][:300]
