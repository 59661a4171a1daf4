"""Shared session fixtures, chained the way data flows:
``synth_data`` (tests/fixtures/data.py) -> ``tiny_checkpoint`` (model.py) -> ``tiny_export``
(export.py) -> ``tiny_index`` (index.py). Each is built once per test session in a temp folder.
"""

pytest_plugins = [
    "tests.fixtures.data",
    "tests.fixtures.model",
    "tests.fixtures.export",
    "tests.fixtures.index",
    "tests.fixtures.service",
    "tests.fixtures.milvus_server",
    "tests.fixtures.ray_build",
    "tests.fixtures.zero_shot",
]
