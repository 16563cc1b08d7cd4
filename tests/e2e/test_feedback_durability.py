"""A 201 means committed: SIGKILL the server mid-stream, restart it, and count.

Eight client threads post 600 feedback records, each with its own Idempotency-Key. When a
third of them have been acknowledged, every server process is SIGKILLed at once (no shutdown
code runs). The server is restarted on the same feedback database and image store, and every
post that got no answer is retried with its key, as a client would. Then every key must be
stored exactly once, and every id answered 201 (before or after the crash) must be in the store.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from service_harness import MODEL_NAME, Served, ServerProcess, start_served

pytestmark = pytest.mark.e2e

N_POSTS = 600
N_CLIENTS = 8
KILL_AFTER_ACKS = N_POSTS // 3


def body(request_id: str, n: int) -> dict:
    return {"request_id": request_id, "model_name": MODEL_NAME, "model_version": "1", "expert_id": "expert",
            "comment": f"post {n}", "rois": [{"shape": "rectangle", "kind": "relevant",
                                             "x": n % 26, "y": n % 16, "width": 4, "height": 4}]}


class Tally:
    """What the clients were told, per Idempotency-Key (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.created: dict[str, str] = {}  # key -> id, answered 201
        self.replayed: dict[str, str] = {}  # key -> id, answered 200 (committed earlier)
        self.unanswered: set[str] = set()  # connection failed or server gone: outcome unknown
        self.killed = threading.Event()

    def acks(self) -> int:
        with self.lock:
            return len(self.created)


def post(client: httpx.Client, url: str, headers: dict, key: str, payload: dict, tally: Tally) -> None:
    try:
        response = client.post(f"{url}/feedback", json=payload, headers={**headers, "Idempotency-Key": key})
    except httpx.TransportError:
        with tally.lock:
            tally.unanswered.add(key)
        return
    with tally.lock:
        if response.status_code == 201:
            assert key not in tally.created, f"{key} created twice"
            tally.created[key] = response.json()["id"]
        elif response.status_code == 200:
            tally.replayed[key] = response.json()["id"]
        elif response.status_code >= 500 and tally.killed.is_set():
            tally.unanswered.add(key)  # e.g. a 503 from a worker dying under the client
        else:
            raise AssertionError(f"{key}: {response.status_code} {response.text}")


def test_every_acknowledged_feedback_survives_a_sigkill_exactly_once(registry):
    served: Served = start_served(registry)
    restarted: ServerProcess | None = None
    try:
        with httpx.Client(timeout=30) as client:
            made = client.post(f"{served.url}/predict", headers=served.headers("predict"),
                               files={"image": ("x.png", _png(), "image/png")})
            assert made.status_code == 200, made.text
        request_id = made.json()["request_id"]
        headers = served.headers("expert")
        payloads = {f"durability-{n:04d}": body(request_id, n) for n in range(N_POSTS)}
        tally = Tally()

        def client_loop(keys: list[str]) -> None:
            with httpx.Client(timeout=30) as http:
                for key in keys:
                    if tally.killed.is_set():
                        with tally.lock:
                            tally.unanswered.add(key)  # never sent before the crash
                        continue
                    post(http, served.url, headers, key, payloads[key], tally)

        def killer() -> None:
            while tally.acks() < KILL_AFTER_ACKS:
                threading.Event().wait(0.005)
            tally.killed.set()
            served.server.kill()

        keys = list(payloads)
        shares = [keys[i::N_CLIENTS] for i in range(N_CLIENTS)]
        with ThreadPoolExecutor(max_workers=N_CLIENTS + 1) as pool:
            kill = pool.submit(killer)
            for future in [pool.submit(client_loop, share) for share in shares]:
                future.result()
            kill.result()
        acked_before_crash = dict(tally.created)
        assert KILL_AFTER_ACKS <= len(acked_before_crash) < N_POSTS, "the kill did not land mid-stream"
        assert tally.unanswered, "no request was cut off by the kill"

        # Same database, image store and tokens; a new port (the old one may linger in TIME_WAIT).
        restarted = ServerProcess(served.server.env, served.workdir / "server-restarted.log",
                                  served.server.repo_root).start()
        restarted.wait_ready()
        retried = sorted(tally.unanswered)
        with httpx.Client(timeout=30) as http:
            for key in retried:
                tally.unanswered.discard(key)
                post(http, restarted.url, headers, key, payloads[key], tally)
        assert not tally.unanswered
        print(f"201 before the kill: {len(acked_before_crash)}, retried after restart: {len(retried)}, "
              f"of which already committed (200): {len(tally.replayed)}")

        answered = {**tally.replayed, **tally.created}
        assert set(answered) == set(payloads), "every key has a definite answer after the retries"
        with httpx.Client(timeout=60) as http:
            stored = _all_feedback(http, restarted.url, headers)
        ids = Counter(item["id"] for item in stored)
        comments = Counter(item["comment"] for item in stored)
        assert all(count == 1 for count in ids.values())
        assert comments == Counter(payload["comment"] for payload in payloads.values()), "each post stored exactly once"
        assert set(tally.created.values()) <= set(ids), "an acknowledged (201) record is missing"
        assert set(acked_before_crash.values()) <= set(ids)
        for key, feedback_id in answered.items():
            assert next(i for i in stored if i["id"] == feedback_id)["comment"] == payloads[key]["comment"]
        with sqlite3.connect(served.state_dir / "feedback.db") as db:
            keys_in_db = Counter(k for (k,) in db.execute("SELECT idempotency_key FROM feedback"))
        assert keys_in_db == Counter(list(payloads)), "one row per Idempotency-Key"
    finally:
        if restarted is not None:
            restarted.stop()
        served.server.stop()


def _all_feedback(http: httpx.Client, url: str, headers: dict) -> list[dict]:
    items: list[dict] = []
    while True:
        page = http.get(f"{url}/feedback", params={"limit": 1000, "offset": len(items)}, headers=headers).json()
        items.extend(page["items"])
        if page["count"] < 1000:
            return items


def _png() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((20, 30, 3), 120, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
