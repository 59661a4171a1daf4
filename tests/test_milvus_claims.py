"""The claims of compir.runtime.milvus_claims on a real Milvus server (tests/fixtures/milvus_server.py;
skipped with the reason where it cannot start), deterministically: while one writer holds a claim
on an id, another writer's add of that id (Gallery.add, replace=False) is refused, and nothing is
written; once the claim is released the id is addable. (The timing races over HTTP are in
test_milvus_server.py and test_service_ray_milvus.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from compir.errors import DuplicateItemError
from compir.manifest import EncoderFingerprint, PreprocessSpec
from compir.runtime.gallery import Gallery
from compir.runtime.milvus_claims import Claims
from compir.runtime.milvus_client import connect
from compir.runtime.milvus_store import MilvusConfig, MilvusStore
from tests.fixtures.milvus_server import MilvusServer

pytest.importorskip("pymilvus", reason="the milvus extra is not installed")

DIM, FEATURES = 8, (2, 4)
PREPROCESS = PreprocessSpec(image_size=32, resize_mode="shortest", interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
ENCODER = EncoderFingerprint(image_encoder_sha256="c" * 64, preprocess=PREPROCESS, embed_dim=DIM, metric="cos")


def test_an_id_claimed_by_another_writer_is_refused_until_released(milvus_server: MilvusServer) -> None:
    config = MilvusConfig(uri=milvus_server.uri, collection="claims_race")
    store = MilvusStore.create(config, ndim=DIM, feature_shape=FEATURES, encoder=ENCODER, overwrite=True)
    gallery = Gallery(encoder=ENCODER, ndim=DIM, feature_shape=FEATURES, store=store)
    rng = np.random.default_rng(0)
    embeds, features = rng.standard_normal((1, DIM)).astype(np.float32), rng.standard_normal((1, *FEATURES)).astype(np.float32)

    def add() -> None:
        gallery.add(["it's x"], embeds=embeds, features=features, paths=["x.png"], replace=False)

    other_writer = Claims(connect(milvus_server.uri), uri=milvus_server.uri, gallery="claims_race")
    with other_writer.hold(["it's x"]):  # another process between its claim and its write
        with pytest.raises(DuplicateItemError, match="being added by another writer"):
            add()
        assert gallery.present(["it's x"]) == set()  # nothing written
    add()  # released: the id is addable
    with pytest.raises(DuplicateItemError, match="already in the gallery"):
        add()
    store.discard()
