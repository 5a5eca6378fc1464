"""Galleries under load: enrolment and search throughput, latency, memory, disk and recall at 1k-100k items.

What it measures, on one service (started here on the shipped models with
``CONVSERVE_DEVICE=cpu`` and a fresh ``CONVSERVE_GALLERY_URL=sqlite:///<tmp>/galleries.db``, or
the one at ``--url`` whose SQLite file ``--db`` names):

1. Enrolment. A gallery (``--gallery``, default ``bench``) bound to ``--model`` is filled with
   view 0 of ``--enrol`` synthetic identities (training.identities, seed ``--seed``, 96 px),
   each its own request body with its own id (the identity's folder) and metadata. wrk drives
   ``POST /galleries/{name}/items`` for ``--seconds`` at each client count, each level into a
   gallery of its own (the first into the benchmark's gallery, the others into ``<name>-c<N>``,
   dropped afterwards), so that no two levels' ids collide. wrk cycles through the bodies, so a
   level that outlasts them adds an id again, which replaces it: req/s counts every enrolment
   (each is embedded and written, fsynced), ``items`` the distinct ids the gallery holds after
   it (from ``GET /galleries/{name}``). Then the enrolments the first level did not reach are
   made one by one (not measured), so the gallery holds every real identity.
2. Sizes (``--sizes``). The gallery is topped up to each size with random unit vectors written
   straight into the SQLite file (service.gallery_store.SqliteGalleryStore.add, batches of
   ``--batch``, ids ``syn-N``) while the service runs: its workers pick them up before their next
   search (``PRAGMA data_version``). At each size, after a short warm-up load (every worker's
   cache brought up to date): the database's size (its pages, those still in the WAL included)
   and the file plus its WAL on disk (the WAL keeps its largest size); ``--queries`` sequential searches
   (view 1 of enrolled identities, k=10) whose answers' ``timing.search_ms`` is the search time
   alone, whose top-10 ids are compared with an exact float64 brute-force search over every
   vector of the gallery read back from the file (the queries' vectors from ``POST /embed``):
   recall@10 against exact; and how often the top match is the query's own identity
   (identity@1), which synthetic distractors can only make harder. Then wrk drives ``POST
   /galleries/{name}/search`` (view 1 of every enrolled identity, k=10) for ``--seconds`` at
   each client count, with the server tree's RSS at rest before the level and its peak during
   it (loadtest.processes.TreeMemory; only with a pid: one started here, or ``--server-pid``).

Prints a Markdown table (one row per operation, size and client count) and writes every figure
to ``--json-out``::

    python -m loadtest.galleries --json-out galleries.json
    python -m loadtest.galleries --url http://127.0.0.1:3000 --server-pid PID --db /path/galleries.db
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np

from loadtest import wrk
from loadtest.benchmark import MB, load_level
from loadtest.processes import service_at, tree_rss

K = 10  # the searches' k, and the recall's cut-off


# --- HTTP ----------------------------------------------------------------------------------------

def http(method: str, url: str, body: bytes | None = None, content_type: str = "application/json",
         timeout: float = 120) -> tuple[int, Any]:
    """(status, parsed JSON answer) of one request; error statuses are returned, not raised."""
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Content-Type": content_type} if body is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def post_image(url: str, image: bytes, fields: dict[str, str]) -> tuple[int, Any]:
    """A multipart POST of ``image`` with ``fields`` (the same body wrk sends)."""
    boundary = uuid.uuid4().hex
    return http("POST", url, wrk.multipart(image, fields, boundary), f"multipart/form-data; boundary={boundary}")


def create_gallery(url: str, name: str, model: str) -> dict[str, Any]:
    """Creates gallery ``name`` bound to ``model``; a name already taken is an error (nothing is overwritten)."""
    status, body = http("POST", f"{url}/galleries", json.dumps({"name": name, "model": model}).encode())
    if status != 201:
        raise SystemExit(f"creating gallery {name!r} answered {status}: {body} (choose another --gallery)")
    return body


def gallery_count(url: str, name: str) -> int:
    """How many items gallery ``name`` holds (``GET /galleries/{name}``)."""
    status, body = http("GET", f"{url}/galleries/{name}")
    if status != 200:
        raise RuntimeError(f"GET /galleries/{name} answered {status}: {body}")
    return body["count"]


def drop_gallery(url: str, name: str) -> None:
    http("DELETE", f"{url}/galleries/{name}")


def gallery_ids(url: str, name: str) -> set[str]:
    """Every item id of gallery ``name``, paged through ``GET /galleries/{name}/items``."""
    ids: set[str] = set()
    offset = 0
    while True:
        status, body = http("GET", f"{url}/galleries/{name}/items?offset={offset}&limit=1000")
        if status != 200:
            raise RuntimeError(f"listing {name} answered {status}: {body}")
        ids.update(item["id"] for item in body["items"])
        if len(body["items"]) < 1000:
            return ids
        offset += 1000


def embed(url: str, model: str, image: bytes) -> np.ndarray:
    """The image's embedding by ``model`` (``POST /embed``), as float64."""
    status, body = post_image(f"{url}/embed?model={model}", image, {})
    if status != 200:
        raise RuntimeError(f"/embed answered {status}: {body}")
    return np.asarray(body["embedding"], np.float64)


# --- data ----------------------------------------------------------------------------------------

def identity_views(folder: Path, identities: int, seed: int) -> list[tuple[str, bytes, bytes]]:
    """(identity, view 0 PNG, view 1 PNG) of ``identities`` synthetic identities (96 px), written under ``folder``."""
    from training.identities import write_identities

    write_identities(folder, identities, 2, seed=seed, size=96)
    return [(d.name, (d / "0000.png").read_bytes(), (d / "0001.png").read_bytes())
            for d in sorted(folder.iterdir()) if d.is_dir()]


def item_fields(identity: str) -> dict[str, str]:
    """The form fields enrolling view 0 of ``identity``: its folder as id and in the metadata."""
    return {"id": identity, "metadata": json.dumps({"identity": identity, "view": 0})}


def enrol_bodies(views: list[tuple[str, bytes, bytes]], folder: Path) -> wrk.Bodies:
    """One wrk body per identity (view 0, its own id and metadata), all with one boundary."""
    folder.mkdir(parents=True, exist_ok=True)
    boundary = uuid.uuid4().hex
    for i, (identity, view0, _) in enumerate(views):
        (folder / f"{i}.body").write_bytes(wrk.multipart(view0, item_fields(identity), boundary))
    return wrk.Bodies(folder, len(views), f"multipart/form-data; boundary={boundary}")


def add_synthetic(db: Path, gallery: str, first: int, count: int, dimension: int, batch: int,
                  rng: np.random.Generator) -> None:
    """``count`` random unit vectors, ids ``syn-<first>``..., written straight into the SQLite file
    in transactions of ``batch`` (the service's workers see them before their next search)."""
    from service.gallery_store import SqliteGalleryStore

    with SqliteGalleryStore(db) as store:
        for start in range(first, first + count, batch):
            n = min(batch, first + count - start)
            vectors = rng.standard_normal((n, dimension)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            store.add(gallery, [(f"syn-{start + j}", {"synthetic": True}, vectors[j]) for j in range(n)])


def disk(db: Path) -> dict[str, float]:
    """MB on disk of the SQLite file and its WAL; of the database itself (its pages, those still in
    the WAL included: the file's size once checkpointed); and of its free pages (dropped galleries')."""
    wal = db.with_name(db.name + "-wal")
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    file_mb, wal_mb = db.stat().st_size / MB, (wal.stat().st_size / MB if wal.exists() else 0.0)
    return {"data_mb": round(pages * page / MB, 1), "file_mb": round(file_mb, 1), "wal_mb": round(wal_mb, 1),
            "disk_mb": round(file_mb + wal_mb, 1), "free_mb": round(free * page / MB, 1)}


def stored_vectors(db: Path, gallery: str) -> tuple[list[str], np.ndarray]:
    """Every (id, unit vector) of ``gallery`` read back from the SQLite file, in insertion order."""
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        rows = conn.execute("SELECT item_id, vector FROM items WHERE gallery = ? ORDER BY added_rev, seq",
                            (gallery,)).fetchall()
    matrix = np.frombuffer(b"".join(r[1] for r in rows), "<f4").reshape(len(rows), -1).astype(np.float64)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    return [r[0] for r in rows], matrix


def exact_top_k(ids: list[str], matrix: np.ndarray, queries: np.ndarray, k: int) -> list[list[str]]:
    """Brute-force cosine top-k of each query (float64, ties in insertion order)."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scores = q @ matrix.T
    return [[ids[i] for i in np.argsort(-row, kind="stable")[:k]] for row in scores]


# --- measurements --------------------------------------------------------------------------------

def latency_row(r: dict[str, Any]) -> dict[str, Any]:
    """The figures of one wrk level that the table shows."""
    return {"req_s": round(r["req_s"], 1), "p50_ms": round(r["p50_ms"], 2), "p99_ms": round(r["p99_ms"], 2),
            "requests": r["requests"], "errors": r["non_2xx"] + r["socket_errors"],
            "rss_peak_mb": r.get("rss_peak_mb")}


def rss_mb(pid: int | None) -> float | None:
    """The server tree's resident memory now, MB (None without a pid)."""
    return round(tree_rss(pid) / MB, 1) if pid else None


def enrol(url: str, pid: int | None, gallery: str, model: str, views: list[tuple[str, bytes, bytes]],
          clients: list[int], seconds: float, folder: Path) -> list[dict[str, Any]]:
    """The enrolment levels (see the module docstring), then the missing real items added one by one."""
    bodies = enrol_bodies(views, folder / "enrol")
    rows = []
    for n, c in enumerate(clients):
        name = gallery if n == 0 else f"{gallery}-c{c}"
        if n:
            create_gallery(url, name, model)
        rest = rss_mb(pid)
        r = load_level(f"{url}/galleries/{name}/items", bodies, c, seconds, pid)
        rows.append({"operation": "enrol", "clients": c, "items": gallery_count(url, name), **latency_row(r),
                     "rss_rest_mb": rest})
        print(json.dumps(rows[-1]), flush=True)
        if n:
            drop_gallery(url, name)
    have = gallery_ids(url, gallery)
    for identity, view0, _ in views:
        if identity not in have:
            status, body = post_image(f"{url}/galleries/{gallery}/items", view0, item_fields(identity))
            if status != 201:
                raise RuntimeError(f"enrolling {identity} answered {status}: {body}")
    return rows


def recall(url: str, db: Path, gallery: str, model: str, queries: list[tuple[str, bytes, np.ndarray]]
           ) -> dict[str, Any]:
    """Sequential searches of ``queries`` (identity, image, /embed vector): the answers'
    search_ms, recall@K of their ids against an exact search over the file's vectors, identity@1."""
    answers, search_ms = [], []
    for _, image, _ in queries:
        status, body = post_image(f"{url}/galleries/{gallery}/search", image, {"k": str(K)})
        if status != 200:
            raise RuntimeError(f"search answered {status}: {body}")
        answers.append([m["id"] for m in body["matches"]])
        search_ms.append(body["timing"]["search_ms"])
    ids, matrix = stored_vectors(db, gallery)
    exact = exact_top_k(ids, matrix, np.stack([v for _, _, v in queries]), K)
    own = [identity for identity, _, _ in queries]
    found = [len(set(a) & set(e)) / len(e) for a, e in zip(answers, exact)]

    def share(hits: list[bool]) -> float:
        return round(float(np.mean(hits)), 4)

    return {"queries": len(queries), "items_in_file": len(ids), "recall_at_10": share(found),
            "recall_min": round(min(found), 4),
            "identity_at_1": share([bool(a) and a[0] == i for a, i in zip(answers, own)]),
            "identity_at_10": share([i in a for a, i in zip(answers, own)]),
            "exact_identity_at_1": share([e[0] == i for e, i in zip(exact, own)]),
            "search_ms_p50": round(float(np.percentile(search_ms, 50)), 3),
            "search_ms_p99": round(float(np.percentile(search_ms, 99)), 3),
            "search_ms_max": round(max(search_ms), 3)}


def search_levels(url: str, pid: int | None, gallery: str, size: int, bodies: wrk.Bodies, clients: list[int],
                  seconds: float, found: dict[str, Any], on_disk: dict[str, float]) -> list[dict[str, Any]]:
    """wrk against the search route at each client count, with RSS at rest and at peak."""
    rows = []
    for c in clients:
        rest = rss_mb(pid)
        r = load_level(f"{url}/galleries/{gallery}/search", bodies, c, seconds, pid)
        rows.append({"operation": "search", "clients": c, "items": size, **latency_row(r), "rss_rest_mb": rest,
                     "search_ms_p50": found["search_ms_p50"], "data_mb": on_disk["data_mb"],
                     "disk_mb": on_disk["disk_mb"],
                     "recall_at_10": found["recall_at_10"], "identity_at_1": found["identity_at_1"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bench(url: str, pid: int | None, db: Path, a: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Every measurement of the module docstring; returns the rows and the per-size figures."""
    sizes = [int(s) for s in a.sizes.split(",")]
    clients = [int(c) for c in a.clients.split(",")]
    if min(sizes) < a.enrol or a.enrol < max(a.queries, K):
        raise SystemExit(f"--sizes must be at least --enrol ({a.enrol}), and --enrol at least --queries and {K}")
    views = identity_views(folder / "identities", a.enrol, a.seed)
    dimension = create_gallery(url, a.gallery, a.model)["dimension"]
    rows = enrol(url, pid, a.gallery, a.model, views, clients, a.seconds, folder)
    search_bodies = wrk.write_bodies([v1 for _, _, v1 in views], {"k": str(K)}, folder / "search")
    step = len(views) / a.queries
    picked = [views[int(i * step)] for i in range(a.queries)]
    queries = [(identity, v1, embed(url, a.model, v1)) for identity, _, v1 in picked]
    rng = np.random.default_rng(a.seed)
    per_size = []
    for size in sizes:
        have = gallery_count(url, a.gallery)
        t0 = time.perf_counter()
        add_synthetic(db, a.gallery, have - a.enrol, size - have, dimension, a.batch, rng)
        insert_s = time.perf_counter() - t0
        wrk.run(f"{url}/galleries/{a.gallery}/search", search_bodies, max(clients), a.warmup_seconds)
        on_disk = disk(db)
        found = recall(url, db, a.gallery, a.model, queries)
        per_size.append({"items": gallery_count(url, a.gallery), "synthetic_insert_s": round(insert_s, 2),
                         **on_disk, **found})
        print(json.dumps(per_size[-1]), flush=True)
        rows += search_levels(url, pid, a.gallery, size, search_bodies, clients, a.seconds, found, on_disk)
    if not a.keep:
        drop_gallery(url, a.gallery)
    return {"rows": rows, "sizes": per_size}


# --- output --------------------------------------------------------------------------------------

def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def _db(row: dict[str, Any]) -> str:
    return f"{row['data_mb']} / {row['disk_mb']}" if "disk_mb" in row else "-"


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of the rows (enrolment and search levels)."""
    lines = ["| items | clients | operation | req/s | p50 ms | p99 ms | errors | search ms p50 (timing) | "
             "server RSS rest/peak MB | DB MB data / file+WAL | recall@10 vs exact | identity@1 |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['items']:,} | {r['clients']} | {r['operation']} | {r['req_s']} | {r['p50_ms']} | "
                     f"{r['p99_ms']} | {r['errors']} | {_cell(r.get('search_ms_p50'))} | "
                     f"{_cell(r['rss_rest_mb'])} / {_cell(r['rss_peak_mb'])} | {_db(r)} | "
                     f"{_cell(r.get('recall_at_10'))} | {_cell(r.get('identity_at_1'))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running service instead of starting one on the shipped models (needs --db)")
    p.add_argument("--server-pid", type=int, help="its main process, for memory")
    p.add_argument("--db", type=Path, help="with --url: the SQLite file of its CONVSERVE_GALLERY_URL")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for the service this starts")
    p.add_argument("--model", default="shapes-identities", help="the embedding model the gallery is bound to")
    p.add_argument("--gallery", default="bench", help="the benchmark's gallery (must not exist)")
    p.add_argument("--sizes", default="1000,10000,100000", help="gallery sizes, each at least --enrol")
    p.add_argument("--clients", default="1,16", help="wrk connections per level")
    p.add_argument("--seconds", type=float, default=5.0, help="per level")
    p.add_argument("--warmup-seconds", type=float, default=1.0, help="search load before each size's measurements")
    p.add_argument("--enrol", type=int, default=1000, help="real identities enrolled through HTTP")
    p.add_argument("--queries", type=int, default=50, help="sequential searches per size for recall and search_ms")
    p.add_argument("--batch", type=int, default=5000, help="synthetic vectors per transaction")
    p.add_argument("--seed", type=int, default=100, help="the identities' seed (and the synthetic vectors')")
    p.add_argument("--keep", action="store_true", help="leave the benchmark's gallery in place")
    p.add_argument("--json-out", type=Path)
    a = p.parse_args(argv)
    if not wrk.available():
        raise SystemExit("wrk is not installed: apt-get install wrk")
    if a.url and not a.db:
        p.error("--url needs --db: the synthetic vectors are written straight into the service's SQLite file")
    started = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="convserve-galleries-"))
    db = a.db or folder / "galleries.db"
    env = a.env if a.url else ["CONVSERVE_DEVICE=cpu", f"CONVSERVE_GALLERY_URL=sqlite:///{db}", *a.env]
    try:
        with service_at(a.url, a.server_pid, env) as (url, pid):
            result = bench(url, pid, db, a, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(table(result["rows"]))
    print(f"\nwall time {result['wall_s']} s")
    if a.json_out:
        a.json_out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
