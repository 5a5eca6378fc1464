"""The gallery stores (service.gallery_store, service.gallery_pgvector): the same behaviour from
both backends, held to a brute-force NumPy search; the SQLite store's sharing between processes
and its durability across kill -9; the pgvector store against a real PostgreSQL + pgvector."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from service.gallery_store import (
    MAX_ITEM_ID_CHARS,
    MAX_METADATA_BYTES,
    DimensionMismatch,
    GalleryExists,
    GalleryNotFound,
    GalleryStore,
    InvalidGalleryRequest,
    InvalidVector,
    SqliteGalleryStore,
)
from tests.support.postgres import postgres_server
from tests.support.servers import ROOT


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


def _pg_store(url: str, schema: str | None = None) -> GalleryStore:
    from service.gallery_pgvector import PgvectorGalleryStore

    return PgvectorGalleryStore(url, schema=schema or f"test_{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=["sqlite", pytest.param("pgvector", marks=pytest.mark.slow)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[GalleryStore]:
    if request.param == "sqlite":
        s = SqliteGalleryStore(tmp_path / "galleries.db")
    else:
        s = _pg_store(request.getfixturevalue("pg_url"))  # a schema of its own: an empty store
    yield s
    s.close()


def brute_force(ids: list[str], vectors: np.ndarray, queries: np.ndarray, k: int,
                threshold: float | None = None) -> list[list[tuple[str, float]]]:
    """Normalise, dot, stable sort by (-score, insertion order)."""
    v = vectors.astype(np.float64)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    answers = []
    for q in queries.astype(np.float64):
        scores = v @ (q / np.linalg.norm(q))
        order = np.lexsort((np.arange(len(ids)), -scores))[:k]
        answers.append([(ids[i], float(scores[i])) for i in order if threshold is None or scores[i] >= threshold])
    return answers


def assert_same(hits: list, expected: list[tuple[str, float]]) -> None:
    assert [h.item_id for h in hits] == [i for i, _ in expected]
    np.testing.assert_allclose([h.score for h in hits], [s for _, s in expected], atol=1e-5, rtol=0)


def _add_all(store: GalleryStore, name: str, ids: list[str], vectors: np.ndarray, batch: int = 500) -> None:
    for start in range(0, len(ids), batch):
        chunk = range(start, min(start + batch, len(ids)))
        assert store.add(name, [(ids[i], {"n": i}, vectors[i]) for i in chunk]) == len(chunk)


# -- the same behaviour from both backends ---------------------------------------------------------


def test_search_equals_a_brute_force_search(store: GalleryStore) -> None:
    rng = np.random.default_rng(7)
    # Not unit length: both sides normalise.
    vectors = (rng.standard_normal((2000, 64)) * rng.uniform(0.1, 10, (2000, 1))).astype(np.float32)
    ids = [f"item-{i}" for i in range(2000)]
    queries = (rng.standard_normal((20, 64)) * 3).astype(np.float32)
    store.create("g", "embedder", "1", 64)
    _add_all(store, "g", ids, vectors)
    assert store.get("g").count == 2000

    hits = store.search("g", queries, k=10)
    assert len(hits) == 20
    for got, want in zip(hits, brute_force(ids, vectors, queries, 10)):
        assert_same(got, want)
    assert hits[0][0].metadata == {"n": int(hits[0][0].item_id.split("-")[1])}

    # A threshold that some queries' tenth hit passes and others' does not.
    threshold = float(np.median([h[-1].score for h in hits]))
    thresholded = store.search("g", queries, k=10, threshold=threshold)
    assert {len(h) for h in thresholded} != {10}
    for got, want in zip(thresholded, brute_force(ids, vectors, queries, 10, threshold)):
        assert_same(got, want)
        assert all(h.score >= threshold for h in got)
    assert store.search("g", queries[:2], k=10, threshold=1.01) == [[], []]

    # k larger than the gallery: every item, best first (a small gallery, so no two scores are nearly tied).
    store.create("small", "embedder", "1", 64)
    _add_all(store, "small", ids[:30], vectors[:30])
    everything = brute_force(ids[:30], vectors[:30], queries[:3], 100)
    for got, want in zip(store.search("small", queries[:3], k=100), everything):
        assert len(got) == 30
        assert_same(got, want)
    # One 1-d query is one query.
    assert store.search("small", queries[0], k=3) == [store.search("small", queries[:1], k=3)[0]]


def test_ties_are_broken_by_insertion_order_and_a_re_added_id_moves_to_the_end(store: GalleryStore) -> None:
    store.create("t", "m", "1", 3)
    same = np.array([1.0, 2.0, 3.0], np.float32)
    store.add("t", [("c", {}, same), ("far", {}, np.array([-1, 0, 0], np.float32)), ("a", {}, same * 2)])
    store.add("t", [("b", {}, same / 8)])  # powers of two: the same unit vector, exactly
    assert [h.item_id for h in store.search("t", same[None], k=3)[0]] == ["c", "a", "b"]
    assert [h.item_id for h in store.search("t", same[None], k=2)[0]] == ["c", "a"]  # the tie at the k-th place too
    store.add("t", [("c", {"again": True}, same)])
    assert [h.item_id for h in store.search("t", same[None], k=4)[0]] == ["a", "b", "c", "far"]
    assert [i.item_id for i in store.items("t")] == ["far", "a", "b", "c"]


def test_upsert_replaces_the_vector_and_the_metadata(store: GalleryStore) -> None:
    store.create("u", "m", "1", 4)
    e = np.eye(4, dtype=np.float32)
    assert store.add("u", [("x", {"v": 1}, e[0]), ("y", {"v": 2}, e[1])]) == 2
    assert store.add("u", [("x", {"v": 3}, e[2])]) == 1
    # Several entries with one id in a batch: the last wins, counted once.
    assert store.add("u", [("z", {"v": 4}, e[3]), ("z", {"v": 5}, e[0] + e[3])]) == 1
    assert store.get("u").count == 3
    assert {i.item_id: i.metadata for i in store.items("u")} == {"y": {"v": 2}, "x": {"v": 3}, "z": {"v": 5}}
    [hits] = store.search("u", e[2:3], k=1)
    assert (hits[0].item_id, hits[0].metadata) == ("x", {"v": 3})
    assert hits[0].score == pytest.approx(1.0, abs=1e-6)
    assert [h.item_id for h in store.search("u", e[0:1], k=3)[0]][0] == "z"  # x no longer points along e0


def test_remove(store: GalleryStore) -> None:
    store.create("r", "m", "1", 2)
    store.add("r", [(f"i{n}", {}, np.array([1, n], np.float32)) for n in range(5)])
    assert store.search("r", np.array([1, 0], np.float32), k=1)[0][0].item_id == "i0"
    assert store.remove("r", ["i0", "i3", "missing", "i0"]) == 2
    assert store.remove("r", ["i0"]) == 0
    assert store.get("r").count == 3
    assert [i.item_id for i in store.items("r")] == ["i1", "i2", "i4"]
    assert [h.item_id for h in store.search("r", np.array([1, 0], np.float32), k=5)[0]] == ["i1", "i2", "i4"]
    assert store.add("r", [("i0", {}, np.array([1, 0], np.float32))]) == 1  # back, at the end
    assert store.search("r", np.array([1, 0], np.float32), k=1)[0][0].item_id == "i0"
    assert [i.item_id for i in store.items("r")] == ["i1", "i2", "i4", "i0"]
    with pytest.raises(GalleryNotFound):
        store.remove("nope", ["i1"])


def test_items_come_in_insertion_order_a_page_at_a_time(store: GalleryStore) -> None:
    store.create("p", "m", "1", 2)
    ids = [f"{n:02d}" for n in range(25)]
    for start in (0, 10, 20):
        store.add("p", [(i, {"i": i}, np.array([1, int(i)], np.float32)) for i in ids[start: start + 10]])
    assert [i.item_id for i in store.items("p", limit=1000)] == ids
    pages = [store.items("p", offset=o, limit=10) for o in (0, 10, 20, 30)]
    assert [[i.item_id for i in page] for page in pages] == [ids[:10], ids[10:20], ids[20:], []]
    assert pages[0][3].metadata == {"i": "03"}
    assert pages[0][0].added_at <= pages[2][0].added_at
    assert store.items("p", limit=0) == []
    assert [i.item_id for i in store.items("p")] == ids  # the default page holds 100


def test_drop(store: GalleryStore) -> None:
    store.create("d", "m", "1", 2)
    store.create("keep", "m", "1", 2)
    store.add("d", [("x", {}, np.array([1, 0], np.float32))])
    store.search("d", np.array([1, 0], np.float32), k=1)
    store.drop("d")
    assert [g.name for g in store.galleries()] == ["keep"]
    for call in (lambda: store.get("d"), lambda: store.drop("d"), lambda: store.items("d"),
                 lambda: store.search("d", np.array([1, 0], np.float32), k=1),
                 lambda: store.add("d", [("y", {}, np.array([1, 0], np.float32))])):
        with pytest.raises(GalleryNotFound, match="'d'"):
            call()
    # Created again, with another dimension: a new, empty gallery.
    store.create("d", "m", "2", 3)
    assert store.search("d", np.array([1, 0, 0], np.float32), k=1) == [[]]
    store.add("d", [("z", {}, np.array([0, 0, 1], np.float32))])
    assert [h.item_id for h in store.search("d", np.array([0, 0, 1], np.float32), k=5)[0]] == ["z"]
    assert store.get("d").version == "2" and store.get("d").count == 1


def test_galleries_are_listed_by_name(store: GalleryStore) -> None:
    for name in ("b", "a", "Z", "a.b", "a-b", "9"):
        store.create(name, "model", "v", 8)
    galleries = store.galleries()
    assert [g.name for g in galleries] == sorted(["b", "a", "Z", "a.b", "a-b", "9"])  # by code point
    for odd in ("é", "a b", "../x", ".hidden", "a/b", "x\n"):
        with pytest.raises(InvalidGalleryRequest, match="a gallery name (is letters, digits|.* control character)"):
            store.create(odd, "model", "v", 8)
    g = store.get("a")
    assert (g.model, g.version, g.dimension, g.metric, g.count) == ("model", "v", 8, "cosine", 0)
    assert galleries[[x.name for x in galleries].index("a")] == g


def test_errors_name_the_gallery_and_leave_the_store_usable(store: GalleryStore) -> None:
    store.create("g", "m", "1", 4)
    ok = np.array([1, 2, 3, 4], np.float32)
    store.add("g", [("kept", {"k": 1}, ok)])
    with pytest.raises(GalleryExists, match="'g'"):
        store.create("g", "m", "1", 4)
    for call in (lambda: store.get("unknown"), lambda: store.items("unknown"),
                 lambda: store.add("unknown", [("x", {}, ok)]), lambda: store.search("unknown", ok, k=1)):
        with pytest.raises(GalleryNotFound, match="'unknown'"):
            call()
    bad_batches = {
        DimensionMismatch: np.ones(5, np.float32),
        InvalidVector: np.array([1, np.nan, 0, 0], np.float32),
    }
    for error, vector in [*bad_batches.items(), (InvalidVector, np.array([1, np.inf, 0, 0])),
                          (InvalidVector, np.zeros(4, np.float32)), (InvalidVector, np.array([1, 2, 3, np.nan])),
                          (DimensionMismatch, np.ones((1, 4), np.float32)), (InvalidVector, ["a", "b", "c", "d"])]:
        # All or nothing: good items around the bad one are not added either.
        with pytest.raises(error, match="'g'"):
            store.add("g", [("new1", {}, ok), ("bad", {}, vector), ("new2", {}, ok)])
    for item in [("", {}, ok), (7, {}, ok), ("a\x00b", {}, ok), ("x" * (MAX_ITEM_ID_CHARS + 1), {}, ok),
                 ("m", [1, 2], ok), ("m", {"x": float("nan")}, ok), ("m", {"x": {1, 2}}, ok),
                 ("m", {"big": "x" * MAX_METADATA_BYTES}, ok), ("\ud800", {}, ok), ("m", {}, ok, "extra")]:
        with pytest.raises(InvalidGalleryRequest, match="'g'"):
            store.add("g", [("new1", {}, ok), item])
    with pytest.raises(DimensionMismatch, match="'g'"):
        store.search("g", np.ones((2, 3), np.float32), k=1)
    for queries, k, threshold in [(np.full((1, 4), np.nan), 1, None), (np.zeros((1, 4)), 1, None),
                                  (ok, 0, None), (ok, 1.5, None), (ok, 1, float("nan")), (ok, 1, "0.5")]:
        with pytest.raises(InvalidGalleryRequest, match="'g'"):
            store.search("g", queries, k=k, threshold=threshold)
    for args in [("", "m", "1", 4), ("h", "m", "1", 0), ("h", "m", "1", 16_001), ("h", "", "1", 4),
                 ("h", "m", "1", 4.0), ("x" * 129, "m", "1", 4)]:
        with pytest.raises(InvalidGalleryRequest):
            store.create(*args)
    with pytest.raises(InvalidGalleryRequest):
        store.items("g", offset=-1)
    with pytest.raises(InvalidGalleryRequest):
        store.remove("g", "kept")  # a string is not a list of ids
    # Nothing of the above was written, and the store still works.
    assert [(i.item_id, i.metadata) for i in store.items("g")] == [("kept", {"k": 1})]
    assert store.get("g").count == 1 and [g.name for g in store.galleries()] == ["g"]
    assert store.add("g", [("new1", {}, ok * -1)]) == 1
    assert [h.item_id for h in store.search("g", ok, k=5)[0]] == ["kept", "new1"]


def test_odd_ids_and_metadata_round_trip_exactly(store: GalleryStore) -> None:
    name = "odd_-gallery.v1"  # gallery names are plain (test_galleries_are_listed_by_name); ids below are not
    store.create(name, "m", "1", 3)
    metadata = {
        "zeta": 1, "alpha": [1, 2.5, None, True, {"deep": {"deeper": ["x", {"deepest": "ü"}]}}],
        "unicode": "日本語 🙂 \u200b e\u0301", "escapes": "quote\" back\\slash\nnewline\ttab \u0000 nul",
        "big": 2**70, "float": 0.1, "neg": -1e-300, "empty": {}, "": "",
        "long": "y" * (MAX_METADATA_BYTES - 1000),
    }
    ids = ["'", '"', "%", "%s", "%(x)s", "\\", "a b", "🖼", "ünï", "x" * MAX_ITEM_ID_CHARS, "{}", "?", "$1", "--"]
    store.add(name, [(item_id, metadata if n == 0 else {"n": n}, np.array([1, n, 0], np.float32))
                     for n, item_id in enumerate(ids)])
    items = store.items(name, limit=100)
    assert [i.item_id for i in items] == ids
    assert items[0].metadata == metadata
    assert list(items[0].metadata) == list(metadata)  # the keys' order too
    assert json.dumps(items[0].metadata) == json.dumps(metadata)
    [hits] = store.search(name, np.array([1, 0, 0], np.float32), k=len(ids))
    assert sorted(h.item_id for h in hits) == sorted(ids)
    assert hits[0].item_id == "'" and hits[0].metadata == metadata
    assert store.remove(name, ["%", "%s", "'"]) == 3
    assert store.get(name).count == len(ids) - 3
    assert [g.name for g in store.galleries()] == [name]


def test_vectors_of_any_finite_magnitude_are_normalised(store: GalleryStore) -> None:
    """Huge and tiny components (whose squares overflow or underflow float32, or that float32
    cannot even hold) score like their directions."""
    store.create("mag", "m", "1", 3)
    store.add("mag", [("huge", {}, np.array([1e30, 1e30, 0], np.float32)),
                      ("tiny", {}, np.array([1e-30, 0, 1e-30], np.float32)),
                      ("float64", {}, np.array([0, 1e200, 0])),
                      ("denormal", {}, np.array([0, 0, 1e-45], np.float32))])
    [hits] = store.search("mag", np.array([1e-40, 1e-40, 0], np.float32), k=4)
    scores = {h.item_id: h.score for h in hits}
    assert scores == pytest.approx({"huge": 1.0, "tiny": 0.5, "float64": 0.5 ** 0.5, "denormal": 0.0}, abs=1e-6)
    assert [h.item_id for h in hits] == ["huge", "float64", "tiny", "denormal"]


def test_the_cache_follows_every_change(store: GalleryStore) -> None:
    """Random batches of adds, re-adds and removes; after each, search equals a brute-force
    search of what should be there (for the SQLite store: its cache applied the change
    incrementally, compacting as removals pile up)."""
    rng = np.random.default_rng(3)
    store.create("c", "m", "1", 8)
    expected: dict[str, np.ndarray] = {}  # in insertion order
    queries = rng.standard_normal((4, 8)).astype(np.float32)
    next_id = 0
    for step in range(14):
        if step in (6, 7, 11) and expected:  # remove most, to compact the cache
            gone = list(rng.choice(list(expected), size=int(len(expected) * 0.7), replace=False))
            assert store.remove("c", gone) == len(gone)
            for i in gone:
                del expected[i]
        else:
            batch = [(f"id{next_id + n}", rng.standard_normal(8).astype(np.float32)) for n in range(300)]
            next_id += 300
            if expected:  # re-add some: they move to the end
                batch += [(i, rng.standard_normal(8).astype(np.float32))
                          for i in rng.choice(list(expected), size=min(50, len(expected)), replace=False)]
            store.add("c", [(i, {}, v) for i, v in batch])
            for i, v in batch:
                expected.pop(i, None)
                expected[i] = v
        ids = list(expected)
        assert store.get("c").count == len(ids)
        want = brute_force(ids, np.stack([expected[i] for i in ids]), queries, 7)
        for got, w in zip(store.search("c", queries, k=7), want):
            assert_same(got, w)


def test_threads_share_one_store(store: GalleryStore) -> None:
    store.create("th", "m", "1", 4)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            rng = np.random.default_rng(t)
            for b in range(5):
                store.add("th", [(f"t{t}-{b}-{n}", {}, rng.standard_normal(4)) for n in range(20)])
                assert len(store.search("th", rng.standard_normal((2, 4)), k=3)[0]) == 3
                store.items("th", limit=5)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.get("th").count == 400
    assert len(store.search("th", np.ones(4), k=1000)[0]) == 400


# -- SQLite only -------------------------------------------------------------------------------------


def test_sqlite_galleries_persist_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((50, 16)).astype(np.float32)
    with SqliteGalleryStore(path) as s:
        s.create("g", "m", "1", 16)
        _add_all(s, "g", [f"i{n}" for n in range(50)], vectors, batch=20)
        s.remove("g", ["i7"])
        before = (s.get("g"), s.items("g"), s.search("g", vectors[:3], k=5))
    with SqliteGalleryStore(path) as s:
        assert (s.get("g"), s.items("g"), s.search("g", vectors[:3], k=5)) == before
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from service.gallery_store import SqliteGalleryStore

    path, action = sys.argv[1], sys.argv[2]
    store = SqliteGalleryStore(path)
    if action == "add":  # add ID:X,Y,... items, vectors given
        store.add("g", [(i, {"from": "child"}, np.array(v, np.float32)) for i, v in json.loads(sys.argv[3])])
    elif action == "remove":
        store.remove("g", json.loads(sys.argv[3]))
    elif action == "recreate":
        store.drop("g")
        store.create("g", "m", "2", 3)
        store.add("g", [("new", {}, np.array([0, 0, 1], np.float32))])
    elif action == "forever":  # add batches until killed, printing each id once its add returned
        for b in range(1_000_000):
            ids = [f"b{b}-{n}" for n in range(20)]
            store.add("g", [(i, {"b": b}, np.random.standard_normal(2)) for i in ids])
            print(*ids, sep="\\n", flush=True)
    store.close()
""")


def _child(path: Path, action: str, arg: object = None) -> None:
    r = subprocess.run([sys.executable, "-c", _CHILD, str(path), action, json.dumps(arg)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.slow
def test_sqlite_another_process_changes_are_seen_without_reopening(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    s = SqliteGalleryStore(path)
    s.create("g", "m", "1", 2)
    s.add("g", [("mine", {}, np.array([1, 0], np.float32))])
    east = np.array([1, 0], np.float32)
    assert [h.item_id for h in s.search("g", east, k=5)[0]] == ["mine"]  # cached now

    _child(path, "add", [["theirs", [1, 0]], ["other", [0, 1]]])
    [hits] = s.search("g", east, k=5)
    assert [(h.item_id, h.metadata) for h in hits] == [("mine", {}), ("theirs", {"from": "child"}),
                                                       ("other", {"from": "child"})]
    _child(path, "add", [["mine", [1, 0]]])  # re-added there: moves to the end here too
    assert [h.item_id for h in s.search("g", east, k=5)[0]] == ["theirs", "mine", "other"]
    _child(path, "remove", ["theirs"])
    assert [h.item_id for h in s.search("g", east, k=5)[0]] == ["mine", "other"]
    assert s.get("g").count == 2
    # What this process sees equals what a fresh store loads from the file.
    with SqliteGalleryStore(path) as fresh:
        assert s.search("g", east, k=5) == fresh.search("g", east, k=5)

    _child(path, "recreate")
    with pytest.raises(DimensionMismatch):
        s.search("g", east, k=5)
    assert [h.item_id for h in s.search("g", np.array([0, 0, 1], np.float32), k=5)[0]] == ["new"]
    s.close()


@pytest.mark.slow
def test_sqlite_acknowledged_items_survive_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    with SqliteGalleryStore(path) as s:
        s.create("g", "m", "1", 2)
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), "forever", "null"], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    acknowledged = []
    try:
        for line in child.stdout:
            acknowledged.append(line.strip())
            if len(acknowledged) >= 600:  # 30 batches in: kill it wherever it is
                break
        os.kill(child.pid, signal.SIGKILL)
        out, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL, err[-2000:]
    acknowledged += [line for line in out.splitlines() if line]  # printed before the kill: acknowledged too
    acknowledged = [i for i in acknowledged if i]

    with SqliteGalleryStore(path) as s:
        present = {i.item_id for i in s.items("g", limit=10_000_000)}
        assert set(acknowledged) <= present
        assert s.get("g").count == len(present)
        assert len(s.search("g", np.array([1, 0], np.float32), k=10)[0]) == 10
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    conn.close()


# -- pgvector only -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pgvector_two_stores_see_each_others_writes(pg_url: str) -> None:
    schema = f"test_{uuid.uuid4().hex[:12]}"
    a, b = _pg_store(pg_url, schema), _pg_store(pg_url, schema)
    try:
        a.create("shared", "m", "1", 2)
        assert b.get("shared").dimension == 2
        with pytest.raises(GalleryExists):
            b.create("shared", "m", "1", 2)
        b.add("shared", [("x", {"by": "b"}, np.array([1, 0], np.float32))])
        assert [(h.item_id, h.metadata) for h in a.search("shared", np.array([1, 0], np.float32), k=3)[0]] == \
            [("x", {"by": "b"})]
        a.add("shared", [("y", {}, np.array([1, 1], np.float32))])
        assert [i.item_id for i in b.items("shared")] == ["x", "y"]
        assert b.remove("shared", ["x"]) == 1
        assert [h.item_id for h in a.search("shared", np.array([1, 0], np.float32), k=3)[0]] == ["y"]
        b.drop("shared")
        with pytest.raises(GalleryNotFound):
            a.search("shared", np.array([1, 0], np.float32), k=1)
    finally:
        a.close()
        b.close()
