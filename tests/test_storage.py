"""The key-value store: behaviour, namespace isolation under hostile keys, limits, concurrency."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from tools.errors import ToolError
from tools.storage import KVStore


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "hone.db"


@pytest.fixture
def store(db_path: Path) -> KVStore:
    return KVStore(db_path)


def test_put_get_update_delete(store: KVStore) -> None:
    assert store.put("alice", "city", "Paris") == "stored 'city' (5 bytes)"
    assert store.get("alice", "city") == "Paris"
    assert store.put("alice", "city", "Zürich") == "updated 'city' (7 bytes)"
    assert store.get("alice", "city") == "Zürich"
    assert store.delete("alice", "city") == "deleted 'city'"
    with pytest.raises(ToolError, match="no key 'city'"):
        store.get("alice", "city")


def test_list_is_sorted_and_prefix_is_literal(store: KVStore) -> None:
    for key in ["b", "a", "ab", "a_c", "a%d", "abc", "é"]:
        store.put("ns", key, "v")
    assert store.list("ns") == ["a", "a%d", "a_c", "ab", "abc", "b", "é"]
    assert store.list("ns", "ab") == ["ab", "abc"]
    # % and _ are LIKE wildcards; here they must only match themselves.
    assert store.list("ns", "a%") == ["a%d"]
    assert store.list("ns", "a_") == ["a_c"]
    assert store.list("ns", "%") == []
    assert store.list("ns", "_") == []
    assert store.list("ns", "zzz") == []


def test_missing_key_hint_names_existing_keys(store: KVStore) -> None:
    with pytest.raises(ToolError, match="Nothing is stored yet"):
        store.get("ns", "anything")
    for i in range(8):
        store.put("ns", f"key{i}", "v")
    with pytest.raises(ToolError) as info:
        store.get("ns", "kye1")
    message = str(info.value)
    assert message.startswith("storage: no key 'kye1'.")
    assert "key" in message and "and more" in message and "'list'" in message
    with pytest.raises(ToolError, match="no key 'nope' to delete"):
        store.delete("ns", "nope")


def test_values_are_stored_verbatim(store: KVStore) -> None:
    values = ["", " padded ", "line1\nline2\ttab", "日本語 🎉", "'; DROP TABLE kv; --", "x" * 1000]
    for value in values:
        store.put("ns", "k", value)
        assert store.get("ns", "k") == value


HOSTILE_KEYS = [
    "secret",
    "../victim/secret",
    "victim/secret",
    "victim:secret",
    "victim.secret",
    "%",
    "_",
    "*",
    "secre_",
    "secr%",
    "' OR '1'='1",
    "secret' OR namespace='victim' --",
    'secret"; DROP TABLE kv; --',
    "SECRET",
    " secret",
    "secret\u200b",
    "ｓｅｃｒｅｔ",
    "秘密",
]


def test_namespaces_cannot_reach_each_other(store: KVStore, db_path: Path) -> None:
    store.put("victim", "secret", "TOP-SECRET")
    store.put("victim", "秘密", "ALSO-SECRET")
    for n, key in enumerate(HOSTILE_KEYS):
        with pytest.raises(ToolError, match="no key"):
            store.get("attacker", key)
        with pytest.raises(ToolError, match="no key"):
            store.delete("attacker", key)
        assert store.list("attacker", key) == []
        with pytest.raises(ToolError) as info:
            store.call("attacker", "get", key, "")
        assert "TOP-SECRET" not in str(info.value) and "ALSO-SECRET" not in str(info.value)
        if n == 0:  # the hint lists the caller's own keys only, and it has none yet
            assert "Nothing is stored yet" in str(info.value)
        # Writing under the hostile key lands in the attacker's own namespace only.
        store.put("attacker", key, "overwritten")
    assert store.list("attacker", "") == sorted(HOSTILE_KEYS)
    assert store.list("victim") == ["secret", "秘密"]
    assert store.get("victim", "secret") == "TOP-SECRET"
    assert store.get("victim", "秘密") == "ALSO-SECRET"
    for key in HOSTILE_KEYS:
        assert store.get("attacker", key) == "overwritten"
    with sqlite3.connect(db_path) as conn:
        rows = conn.execute("SELECT namespace, count(*) FROM kv GROUP BY namespace").fetchall()
    assert dict(rows) == {"victim": 2, "attacker": len(HOSTILE_KEYS)}


@pytest.mark.parametrize("namespace", ["%", "_", "victi_", "victim%", "victim'--", "VICTIM"])
def test_lookalike_namespaces_are_distinct(store: KVStore, namespace: str) -> None:
    store.put("victim", "secret", "TOP-SECRET")
    assert store.list(namespace) == []
    with pytest.raises(ToolError):
        store.get(namespace, "secret")


def test_limits(db_path: Path) -> None:
    store = KVStore(db_path, max_key_chars=8, max_value_bytes=10, max_keys=3)
    with pytest.raises(ToolError, match="key too long"):
        store.put("ns", "123456789", "v")
    store.put("ns", "12345678", "v")
    with pytest.raises(ToolError, match=r"value too large \(12 bytes, limit 10\)"):
        store.put("ns", "k", "éééééé")  # 6 characters, 12 bytes: the limit is on bytes
    store.put("ns", "k", "1234567890")
    store.put("ns", "k2", "v")
    with pytest.raises(ToolError, match="limit of 3 keys"):
        store.put("ns", "k3", "v")
    store.put("ns", "k", "updating an existing key is fine"[:10])
    store.put("other", "k3", "v")  # the key limit is per namespace
    store.delete("ns", "k2")
    store.put("ns", "k3", "v")
    assert store.list("ns") == ["12345678", "k", "k3"]


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("", "non-empty"),
        ("a\nb", "control characters"),
        ("a\x00b", "control characters"),
        ("\ud800", "not valid text"),
        (5, "non-empty text"),
    ],
)
def test_bad_keys(store: KVStore, key: object, message: str) -> None:
    with pytest.raises(ToolError, match=message):
        store.put("ns", key, "v")  # type: ignore[arg-type]


def test_bad_values(store: KVStore) -> None:
    with pytest.raises(ToolError, match="must be text"):
        store.put("ns", "k", 42)  # type: ignore[arg-type]
    with pytest.raises(ToolError, match="not valid text"):
        store.put("ns", "k", "\udfff")


def test_namespace_is_required(store: KVStore) -> None:
    # The namespace is set by hone, never by the model: a missing one is a bug, not a ToolError.
    with pytest.raises(ValueError):
        store.put("", "k", "v")


def test_call_dispatch(store: KVStore) -> None:
    assert store.call("ns", "put", "name", "Ada") == "stored 'name' (3 bytes)"
    assert store.call("ns", " GET ", "name", "ignored") == "Ada"
    assert store.call("ns", "put", "empty", "") == "stored 'empty' (0 bytes)"
    assert store.call("ns", "get", "empty", "") == "(the stored value is an empty string)"
    assert store.call("ns", "list", "", "") == '2 key(s): ["empty", "name"]'
    assert store.call("ns", "list", "na", "") == '1 key(s): ["name"]'
    assert store.call("ns", "list", None, None) == '2 key(s): ["empty", "name"]'
    assert store.call("ns", "list", "zz", "") == "no keys starting with 'zz'"
    assert store.call("fresh", "list", "", "") == "no keys stored yet"
    assert store.call("ns", "delete", "name", "") == "deleted 'name'"
    with pytest.raises(ToolError, match="unknown action 'drop'; use one of put, get, list"):
        store.call("ns", "drop", "name", "")
    with pytest.raises(ToolError, match="needs a value"):
        store.call("ns", "put", "k", None)
    with pytest.raises(ToolError, match="'get' needs a non-empty key"):
        store.call("ns", "get", "", "")


def test_persistence_schema_and_wal(db_path: Path) -> None:
    KVStore(db_path).put("ns", "k", "v")
    assert KVStore(db_path).get("ns", "k") == "v"
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        columns = {row[1]: row[5] for row in conn.execute("PRAGMA table_info(kv)")}
    assert columns == {"namespace": 1, "key": 2, "value": 0, "updated_at": 0}


def test_shares_the_database_with_other_tables(db_path: Path) -> None:
    with sqlite3.connect(db_path) as conn:
        conn.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, note TEXT)")
        conn.execute("INSERT INTO runs (note) VALUES ('kept')")
    store = KVStore(db_path)
    store.put("ns", "k", "v")
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT note FROM runs").fetchall() == [("kept",)]


def test_incompatible_existing_table_is_reported(db_path: Path) -> None:
    with sqlite3.connect(db_path) as conn:
        conn.execute("CREATE TABLE kv (k TEXT PRIMARY KEY, v TEXT)")
    with pytest.raises(RuntimeError, match="incompatible schema"):
        KVStore(db_path)


def test_waits_for_another_writer(store: KVStore, db_path: Path) -> None:
    # Another part of hone holds a write lock on the shared file for a moment.
    locked = threading.Event()

    def hold_lock() -> None:
        conn = sqlite3.connect(db_path, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        locked.set()
        time.sleep(0.3)
        conn.execute("COMMIT")
        conn.close()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    locked.wait()
    start = time.monotonic()
    store.put("ns", "k", "v")
    waited = time.monotonic() - start
    holder.join()
    assert waited >= 0.2
    assert store.get("ns", "k") == "v"


def test_concurrent_threads(db_path: Path) -> None:
    store = KVStore(db_path, max_keys=100)
    errors: list[BaseException] = []
    refused: list[str] = []

    def worker(n: int) -> None:
        try:
            for i in range(25):
                try:
                    store.put("shared", f"w{n}-k{i}", f"{n}:{i}")
                except ToolError as exc:
                    refused.append(str(exc))
                store.put(f"own{n}", f"k{i}", str(i))
                assert store.get(f"own{n}", f"k{i}") == str(i)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    # 200 inserts raced for 100 slots: the count check and the insert are one transaction.
    assert len(store.list("shared")) == 100
    assert len(refused) == 100 and all("limit of 100 keys" in r for r in refused)
    for n in range(8):
        assert len(store.list(f"own{n}")) == 25


def test_snapshot_and_restore_carry_a_namespaces_exact_state(store: KVStore) -> None:
    """What a run started from is recorded (snapshot) and set up again for its re-run (restore)."""
    store.put("user-a", "gym_pin", "7807")
    store.put("user-a", "city", "Zürich")
    store.put("user-b", "gym_pin", "1111")
    state = store.snapshot("user-a", max_bytes=1000)
    assert state == {"city": "Zürich", "gym_pin": "7807"}
    # bytes, not characters: "city" + "Zürich" is 4 + 7, "gym_pin" + "7807" is 7 + 4
    assert store.snapshot("user-a", max_bytes=22) == state and store.snapshot("user-a", max_bytes=21) is None
    assert store.snapshot("empty", max_bytes=0) == {}

    store.put("explore-1", "stale", "x")
    store.restore("explore-1", state)
    assert store.snapshot("explore-1", max_bytes=1000) == state  # replaced, not merged
    assert store.get("user-b", "gym_pin") == "1111"  # other namespaces untouched
    store.restore("explore-1", {})
    assert store.list("explore-1") == []


def test_restore_refuses_what_put_would_refuse(db_path: Path) -> None:
    small = KVStore(db_path, max_keys=2, max_value_bytes=4)
    with pytest.raises(ToolError, match="exceed the limit of 2"):
        small.restore("ns", {"a": "1", "b": "2", "c": "3"})
    with pytest.raises(ToolError, match="value too large"):
        small.restore("ns", {"a": "12345"})
    small.put("ns", "kept", "1")
    with pytest.raises(ToolError, match="control characters"):
        small.restore("ns", {"bad\nkey": "1"})
    assert small.get("ns", "kept") == "1"  # a refused restore changes nothing
