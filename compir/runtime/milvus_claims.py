"""Duplicate-id refusal (HTTP 409) among the writers of one Milvus *server* collection, which share
no lock and no process: several ``compir serve`` processes, the replicas of ``compir serve --ray``.

Milvus 2.3 has no unique key (a primary key may repeat) and no conditional insert, so an add with
``replace=False`` first *claims* its ids in a collection beside the gallery, ``<collection>__claims``:
``claim`` (INT64 primary key, auto id), ``item_id`` (VARCHAR), ``claimed`` (INT64, the claimer's
clock in ns) and ``unused`` (a 2-dim vector: Milvus needs one in every collection), read with
Strong consistency. One add of ids X:

1. insert one claim per id of X (one request; Milvus allocates their primary keys);
2. query every claim on X (Strong, the filter from :func:`~compir.runtime.milvus_client.in_filter`);
   if a live claim of another writer on one of them has a smaller primary key, delete ours and
   refuse them (:class:`~compir.errors.DuplicateItemError`, "being added by another writer");
3. then query the gallery for X (the Gallery's own check, after step 2): refuse any it holds;
4. write the items, then delete our claims (also when the write fails).

**Why at most one of two racers writes an id** (a standalone server: one proxy). Say A and B both
claim X and pk(B) < pk(A). A writes only if its step-2 query missed B's claim, so B's insert has a
later timestamp than A's query (a Strong query sees every write timestamped before it). But the
proxy gives an insert its timestamp when it queues it, before it allocates the insert's auto ids,
and both allocators only count up: B's timestamp came before B's id, which came before A's id,
before A's insert was acknowledged, before A's query got its timestamp. Contradiction. A racer
that comes after the winner deleted its claim sees the winner's items instead: they were
acknowledged before the claim was deleted, and step 3 reads after step 2. At least one writes:
the smallest live claim sees no smaller one. (Two adds of several ids each can interleave so
that both are refused; neither is ever half written.)

**Where this is not sound**: a Milvus cluster with several proxies. Each proxy hands out auto ids
from a range it fetched earlier, so an insert through one proxy can get a smaller id than an
earlier insert through another, and both racers may write (the second upsert replaces the first:
two 200s, still one row). Milvus 2.3 offers nothing stronger (no unique constraint, no
compare-and-set, no transaction); the rule is the smallest primary key because the server, not
the writers' clocks, orders the keys.

**Stale claims**: a writer that dies between steps 1 and 4 leaves its claim behind; claims older
than :data:`CLAIM_TTL_S` by the reader's clock are ignored, so such an id is refused for at most
that long (writers' clocks must agree well within it; a live writer is far quicker). Claims are
not kept with the items, nor deleted when an item is removed: a removal that deleted every claim
on X would also delete one in flight and let a later racer past it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from compir.errors import CompirError, DuplicateItemError, InputError
from compir.runtime.milvus_client import call, in_filter
from compir.runtime.uploads import MAX_ID_CHARS

CLAIM_TTL_S = 120  # a claim older than this is a dead writer's: its id is addable again
CLAIMS_OF_PROPERTY = "compir.claims_of"  # the claims collection's property: the gallery collection it guards


class Claims:
    """The claims collection of gallery collection ``gallery`` on the server at ``uri``."""

    def __init__(self, client: Any, *, uri: str, gallery: str) -> None:
        self._client, self.uri = client, uri
        self.name = f"{gallery}__claims"
        self._gallery = gallery
        self._loaded = False

    def ensure(self) -> None:
        """Create the collection if it is missing (an index built by an older compir), then load it;
        the first :meth:`hold` does it (a process that only reads never needs the collection)."""
        if not self._exists():
            try:
                self._create()
            except CompirError:
                if not self._exists():  # else another writer created it meanwhile
                    raise
        call(self._client.load_collection, self.name, what=f"load collection {self.name!r}", uri=self.uri)
        self._loaded = True

    @contextmanager
    def hold(self, ids: Sequence[str]) -> Iterator[None]:
        """Steps 1-2 of the module docstring on entry (DuplicateItemError naming the ids another
        writer holds), step 4's delete of our claims on exit."""
        if not self._loaded:
            self.ensure()
        now = time.time_ns()
        rows = [{"item_id": item, "claimed": now, "unused": [0.0, 0.0]} for item in ids]
        ours = [int(pk) for pk in call(self._client.insert, self.name, rows, what=f"claim {len(rows)} ids", uri=self.uri)["ids"]]
        try:
            found = call(self._client.query, self.name, filter=in_filter("item_id", list(dict.fromkeys(ids))),
                         output_fields=["claim", "item_id", "claimed"], consistency_level="Strong", what="read claims", uri=self.uri)
            first: dict[str, int] = {}  # item id -> smallest live claim on it
            for row in found:
                if int(row["claimed"]) >= now - CLAIM_TTL_S * 10**9 or int(row["claim"]) in ours:
                    item = str(row["item_id"])
                    first[item] = min(first.get(item, int(row["claim"])), int(row["claim"]))
            taken = [item for item, pk in zip(ids, ours, strict=True) if first.get(item, pk) < pk]
            if taken:
                raise DuplicateItemError(f"being added by another writer: {taken[:5]}{' ...' if len(taken) > 5 else ''}; "
                                         "retry to see its outcome, or add with replace=true to replace it")
            yield
        finally:
            call(self._client.delete, self.name, filter=in_filter("claim", ours), what="release claims", uri=self.uri)

    def drop(self) -> None:
        """Drop the collection if it exists (refused if it is not compir's claims of this gallery)."""
        if not self._exists():
            return
        properties = call(self._client.describe_collection, self.name, what=f"describe collection {self.name!r}",
                          uri=self.uri).get("properties", {})
        if properties.get(CLAIMS_OF_PROPERTY) != self._gallery:
            raise InputError(f"Milvus collection {self.name!r} at {self.uri} is not compir's claims of {self._gallery!r}; "
                              "choose another --collection")
        call(self._client.drop_collection, self.name, what=f"drop collection {self.name!r}", uri=self.uri)

    def _exists(self) -> bool:
        return bool(call(self._client.has_collection, self.name, what=f"look up collection {self.name!r}", uri=self.uri))

    def _create(self) -> None:
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=True, enable_dynamic_field=False)
        schema.add_field("claim", DataType.INT64, is_primary=True)
        schema.add_field("item_id", DataType.VARCHAR, max_length=4 * MAX_ID_CHARS)  # bytes: 4 per UTF-8 char
        schema.add_field("claimed", DataType.INT64)
        schema.add_field("unused", DataType.FLOAT_VECTOR, dim=2)
        index = self._client.prepare_index_params()
        index.add_index(field_name="unused", index_type="FLAT", metric_type="L2", params={})
        call(self._client.create_collection, self.name, schema=schema, index_params=index, consistency_level="Strong",
             properties={CLAIMS_OF_PROPERTY: self._gallery}, what=f"create collection {self.name!r}", uri=self.uri)
