"""TrajectoryStore and the schema, on real SQLite files (and real processes for recovery/concurrency)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import sqlite_utils

from runtime import schema
from runtime.store import NotFound, TrajectoryStore

REPO = Path(__file__).resolve().parents[1]

TRAJECTORY_COLUMNS = {
    "id", "created_at", "finished_at", "status", "caller", "thread_id", "request_key", "task_id", "source",
    "request", "metadata", "final_answer", "error", "model", "adapter", "n_steps", "n_tool_calls",
    "n_tool_errors", "prompt_tokens", "completion_tokens", "latency_ms", "writer", "label", "label_source",
    "label_score", "labeled_at", "storage_state",
}
MESSAGE_COLUMNS = {
    "trajectory_id", "idx", "role", "content", "tool_calls", "tool_call_id", "name", "is_error", "model",
    "adapter", "started_at", "latency_ms", "prompt_tokens", "completion_tokens", "prompt_token_ids",
    "completion_token_ids", "finish_reason", "generated",
}


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "hone.db"


@pytest.fixture
def store(db_path: Path):
    s = TrajectoryStore(db_path)
    yield s
    s.close()


def start(store: TrajectoryStore, **overrides) -> str:
    kwargs = dict(
        caller="alice", thread_id=None, request={"messages": [{"role": "user", "content": "2+2?"}]},
        metadata=None, request_key="k1", model="hone-base",
    )
    kwargs.update(overrides)
    return store.start(**kwargs)


def tool_run_messages() -> list[dict]:
    """A history turn from the client, then this run: a tool call that fails, a retry, an answer."""
    call = lambda i: {"id": f"call_{i}", "type": "function", "function": {"name": "python", "arguments": '{"code": "2+2"}'}}  # noqa: E731
    return [
        {"role": "system", "content": "You are hone."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [call("h")]},  # history: not generated
        {"role": "tool", "content": "boom", "tool_call_id": "call_h", "name": "python", "is_error": True},
        {"role": "assistant", "content": "hello", "generated": False},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "", "tool_calls": [call(0), call(1)], "generated": True, "model": "hone-base",
         "adapter": None, "started_at": 1.5, "latency_ms": 12.0, "prompt_tokens": 100, "completion_tokens": 9,
         "prompt_token_ids": [1, 2, 3], "completion_token_ids": [7, 8, 9], "finish_reason": "tool_calls"},
        {"role": "tool", "content": "SyntaxError", "tool_call_id": "call_0", "name": "python", "is_error": True,
         "started_at": 2.0, "latency_ms": 3.0},
        {"role": "tool", "content": "4", "tool_call_id": "call_1", "name": "python", "is_error": False},
        {"role": "assistant", "content": "4", "generated": True, "model": "hone-base", "adapter": "v3",
         "prompt_tokens": 130, "completion_tokens": 2, "prompt_token_ids": [1, 2, 3, 4],
         "completion_token_ids": [52, 0], "finish_reason": "stop"},
    ]


# ---------------------------------------------------------------- schema


def test_schema_is_created_with_documented_columns_and_settings(db_path: Path) -> None:
    db = schema.connect(db_path)
    assert schema.migrate(db) == schema.SCHEMA_VERSION == 4
    assert set(db["trajectories"].columns_dict) == TRAJECTORY_COLUMNS
    assert set(db["messages"].columns_dict) == MESSAGE_COLUMNS
    assert set(db["feedback"].columns_dict) == {"id", "trajectory_id", "score", "comment", "caller", "created_at"}
    assert set(db["active_adapter"].columns_dict) == {"id", "name", "path", "updated_at"}
    assert db["messages"].pks == ["trajectory_id", "idx"]
    indexed = {tuple(i.columns)[0] for i in db["trajectories"].indexes}
    assert {"status", "created_at", "request_key", "task_id", "adapter", "label"} <= indexed
    assert db.journal_mode == "wal"
    assert db.execute("PRAGMA busy_timeout").fetchone()[0] >= 5000
    assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    # The single-row pointer exists from the start and refuses a second row.
    assert db.execute("SELECT id, name, path FROM active_adapter").fetchall() == [(1, None, None)]
    with pytest.raises(sqlite3.IntegrityError):
        db.execute("INSERT INTO active_adapter (id, name, path, updated_at) VALUES (2, 'x', 'y', 0)")


def test_migrate_is_idempotent(db_path: Path) -> None:
    db = schema.connect(db_path)
    schema.migrate(db)
    before = db.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
    assert schema.migrate(db) == schema.SCHEMA_VERSION
    assert TrajectoryStore(db_path).schema_version == schema.SCHEMA_VERSION  # a second opener
    assert db.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall() == before


def test_empty_version_0_database_is_migrated(db_path: Path) -> None:
    conn = sqlite3.connect(db_path)  # an existing file that hone never touched
    conn.execute("PRAGMA user_version")
    conn.close()
    assert schema.schema_version(schema.connect(db_path)) == 0
    with TrajectoryStore(db_path) as s:
        assert s.schema_version == schema.SCHEMA_VERSION
        assert s.get(start(s))["status"] == "running"


def test_older_database_gets_only_the_pending_migrations_and_keeps_its_data(db_path: Path) -> None:
    with TrajectoryStore(db_path) as s:
        traj_id = start(s)
    calls = []

    def m002_add_column(db: sqlite_utils.Database) -> None:
        calls.append(1)
        db["trajectories"].add_column("reviewed", int)

    db = schema.connect(db_path)
    n = schema.SCHEMA_VERSION + 1
    assert schema.migrate(db, migrations=(*schema.MIGRATIONS, m002_add_column)) == n
    assert schema.migrate(db, migrations=(*schema.MIGRATIONS, m002_add_column)) == n
    assert calls == [1]
    assert "reviewed" in db["trajectories"].columns_dict
    assert db["trajectories"].get(traj_id)["status"] == "running"


def test_failed_migration_is_rolled_back_entirely(db_path: Path) -> None:
    db = schema.connect(db_path)
    schema.migrate(db)

    def m002_broken(db: sqlite_utils.Database) -> None:
        db["half_done"].create({"x": int})
        raise RuntimeError("bug in migration")

    with pytest.raises(RuntimeError, match="bug in migration"):
        schema.migrate(db, migrations=(*schema.MIGRATIONS, m002_broken))
    assert schema.schema_version(db) == schema.SCHEMA_VERSION
    assert not db["half_done"].exists()
    assert not db.conn.in_transaction


def test_database_from_a_newer_hone_is_refused(db_path: Path) -> None:
    db = schema.connect(db_path)
    schema.migrate(db)
    db.execute("PRAGMA user_version = 99")
    with pytest.raises(schema.SchemaError, match="newer"):
        TrajectoryStore(db_path)


# ---------------------------------------------------------------- start / finish / get


def test_ids_sort_by_creation_time(store: TrajectoryStore) -> None:
    ids = [start(store) for _ in range(50)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 50


def test_start_finish_round_trip(store: TrajectoryStore) -> None:
    raw = json.dumps({"messages": [{"role": "user", "content": "2+2?"}], "stream": False})
    traj_id = start(store, request=raw, metadata={"task_id": 17, "expected_answer": "4"}, thread_id="th1")
    running = store.get(traj_id)
    assert running["status"] == "running" and running["messages"] == [] and running["finished_at"] is None
    assert running["task_id"] == "17"  # taken from metadata
    assert running["writer"] == store.writer

    messages = tool_run_messages()
    store.finish(traj_id, status="ok", messages=messages, final_answer="4", error=None, adapter="v3", latency_ms=321.0)

    t = store.get(traj_id)
    assert t["status"] == "ok" and t["final_answer"] == "4" and t["adapter"] == "v3" and t["latency_ms"] == 321.0
    assert t["finished_at"] >= t["created_at"]
    assert t["request"] == json.loads(raw) and t["metadata"] == {"task_id": 17, "expected_answer": "4"}
    assert (t["caller"], t["thread_id"], t["request_key"], t["source"], t["model"]) == ("alice", "th1", "k1", "serve", "hone-base")
    # Counts cover this run only: the history's assistant turns and its failed tool are excluded.
    assert (t["n_steps"], t["n_tool_calls"], t["n_tool_errors"]) == (2, 2, 1)
    assert (t["prompt_tokens"], t["completion_tokens"]) == (230, 11)
    assert t["feedback"] == []

    got = t["messages"]
    assert [m["idx"] for m in got] == list(range(len(messages)))
    assert [m["generated"] for m in got] == [False] * 6 + [True, False, False, True]
    step = got[6]
    assert step["tool_calls"] == messages[6]["tool_calls"]
    assert step["prompt_token_ids"] == [1, 2, 3] and step["completion_token_ids"] == [7, 8, 9]
    assert (step["model"], step["adapter"], step["finish_reason"], step["latency_ms"]) == ("hone-base", None, "tool_calls", 12.0)
    assert got[7]["is_error"] is True and got[7]["tool_call_id"] == "call_0"
    assert got[7]["name"] == "python" and got[7]["started_at"] == 2.0
    assert got[8]["is_error"] is False
    assert got[9]["adapter"] == "v3" and got[9]["completion_token_ids"] == [52, 0]
    assert got[1]["tool_calls"] is None and got[1]["prompt_token_ids"] is None


def test_token_sums_are_null_when_unreported(store: TrajectoryStore) -> None:
    traj_id = start(store)
    store.finish(traj_id, status="ok", messages=[{"role": "user", "content": "x"},
                 {"role": "assistant", "content": "y", "generated": True}], final_answer="y")
    t = store.get(traj_id)
    assert (t["n_steps"], t["n_tool_calls"], t["prompt_tokens"], t["completion_tokens"]) == (1, 0, None, None)


@pytest.mark.parametrize(
    "status, messages, match",
    [
        ("done", [], "unknown final status"),
        ("running", [], "unknown final status"),
        ("ok", [{"role": "robot", "content": "x"}], "role must be one of"),
        ("ok", [{"role": "user", "content": "x", "completion_token_id": [1]}], "unknown keys"),
        ("ok", [{"role": "assistant", "content": "x", "completion_token_ids": [1, "2"]}], "list of ints"),
        ("ok", [{"role": "user", "content": [{"type": "text", "text": "x"}]}], "content must be a string"),
        ("ok", [{"role": "tool", "content": "x", "generated": True}], "only assistant"),
    ],
)
def test_finish_rejects_invalid_input_and_writes_nothing(store: TrajectoryStore, status, messages, match) -> None:
    traj_id = start(store)
    with pytest.raises(ValueError, match=match):
        store.finish(traj_id, status=status, messages=messages)
    assert store.get(traj_id)["status"] == "running"


def test_finish_unknown_id_and_double_finish(store: TrajectoryStore) -> None:
    with pytest.raises(NotFound):
        store.finish("t_0000000000000000000000", status="ok", messages=[])
    traj_id = start(store)
    store.finish(traj_id, status="parse_error", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="not running"):
        store.finish(traj_id, status="ok", messages=[{"role": "user", "content": "x"}])
    assert store.get(traj_id)["status"] == "parse_error"
    assert len(store.get(traj_id)["messages"]) == 1


def test_finish_is_one_transaction(store: TrajectoryStore, db_path: Path) -> None:
    # Make the 3rd message insert fail inside SQLite: the summary update and the first two messages
    # must be rolled back with it.
    db = schema.connect(db_path)
    db.execute(
        "CREATE TRIGGER boom BEFORE INSERT ON messages WHEN NEW.content = 'boom' "
        "BEGIN SELECT RAISE(ABORT, 'boom'); END"
    )
    traj_id = start(store)
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "generated": True},
            {"role": "user", "content": "boom"}]
    with pytest.raises(sqlite3.IntegrityError, match="boom"):
        store.finish(traj_id, status="ok", messages=msgs)
    t = store.get(traj_id)
    assert t["status"] == "running" and t["n_steps"] is None and t["messages"] == []
    db.execute("DROP TRIGGER boom")
    store.finish(traj_id, status="ok", messages=msgs)  # the store is still usable
    assert store.get(traj_id)["n_steps"] == 1


def test_start_validates_request_and_metadata(store: TrajectoryStore) -> None:
    with pytest.raises(ValueError, match="not valid JSON"):
        start(store, request="{not json")
    with pytest.raises(ValueError, match="metadata"):
        start(store, metadata=["task"])
    with pytest.raises(ValueError, match="JSON"):
        start(store, metadata={"x": object()})


def test_get_unknown_returns_none(store: TrajectoryStore) -> None:
    assert store.get("t_0000000000000000000000") is None


# ---------------------------------------------------------------- list / count / export


def seed(store: TrajectoryStore, db_path: Path) -> dict[str, str]:
    """Six trajectories with distinct attributes; returns name -> id."""
    ids = {
        "a": start(store, caller="alice", metadata={"task_id": "t1"}),
        "b": start(store, caller="bob", source="eval"),
        "c": start(store, caller="alice", source="exploration", metadata={"task_id": "t1"}),
        "d": start(store, caller="bob"),
        "e": start(store, caller="alice"),
        "f": start(store, caller="alice"),  # left running
    }
    store.finish(ids["a"], status="ok", messages=[], adapter=None)
    store.finish(ids["b"], status="tool_error", messages=[], adapter="v1")
    store.finish(ids["c"], status="ok", messages=[], adapter="v2")
    store.finish(ids["d"], status="step_limit", messages=[], adapter="v1")
    store.finish(ids["e"], status="engine_error", messages=[], adapter=None)
    db = schema.connect(db_path)  # the learner's side: labels and a controlled created_at
    db.execute("UPDATE trajectories SET label = 'success', label_source = 'feedback', label_score = 1 WHERE id IN (?, ?)",
               [ids["a"], ids["c"]])
    db.execute("UPDATE trajectories SET label = 'failure' WHERE id = ?", [ids["b"]])
    for n, key in enumerate("abcdef"):
        db.execute("UPDATE trajectories SET created_at = ? WHERE id = ?", [1000.0 + n, ids[key]])
    return ids


@pytest.mark.parametrize(
    "filters, expected",
    [
        ({}, "fedcba"),
        ({"status": "ok"}, "ca"),
        ({"status": "running"}, "f"),
        ({"label": "success"}, "ca"),
        ({"adapter": "v1"}, "db"),
        ({"adapter": "base"}, "fea"),  # NULL adapter, the running one included
        ({"caller": "bob"}, "db"),
        ({"source": "eval"}, "b"),
        ({"source": "serve", "caller": "alice"}, "fea"),
        ({"task_id": "t1"}, "ca"),
        ({"since": 1002.0}, "fedc"),
        ({"until": 1002.0}, "ba"),
        ({"since": 1001.0, "until": 1004.0, "caller": "bob"}, "db"),
        ({"request_key": "nope"}, ""),
    ],
)
def test_filters(store: TrajectoryStore, db_path: Path, filters: dict, expected: str) -> None:
    ids = seed(store, db_path)
    names = {v: k for k, v in ids.items()}
    rows, cursor = store.list(**filters)
    assert "".join(names[r["id"]] for r in rows) == expected
    assert cursor is None
    assert store.count(**filters) == len(expected)
    assert [t["id"] for t in store.export(**filters)] == [r["id"] for r in rows]


def test_filter_validation(store: TrajectoryStore) -> None:
    with pytest.raises(ValueError, match="unknown status"):
        store.list(status="OK")
    with pytest.raises(ValueError, match="limit"):
        store.list(limit=0)
    with pytest.raises(ValueError, match="since"):
        store.count(since="yesterday")


def test_cursor_paging_has_no_gaps_or_duplicates(store: TrajectoryStore) -> None:
    all_ids = [start(store, caller="alice" if i % 3 else "bob") for i in range(23)]
    for filters, expected in (({}, all_ids[::-1]), ({"caller": "alice"}, [i for n, i in enumerate(all_ids) if n % 3][::-1])):
        seen, cursor, pages = [], None, 0
        while True:
            rows, cursor = store.list(limit=5, cursor=cursor, **filters)
            seen += [r["id"] for r in rows]
            pages += 1
            if cursor is None:
                break
        assert seen == expected
        assert pages == -(-len(expected) // 5)


def test_new_rows_do_not_shift_later_pages(store: TrajectoryStore) -> None:
    old = [start(store) for _ in range(6)]
    first, cursor = store.list(limit=3)
    new = [start(store) for _ in range(4)]
    second, cursor = store.list(limit=3, cursor=cursor)
    assert [r["id"] for r in first + second] == old[::-1]
    assert cursor is None
    assert not set(new) & {r["id"] for r in second}


@pytest.mark.parametrize("cursor", ["garbage", "", "dHJhc2g", "djE6dF9ub3RhbmlkZW50aWZpZXI"])
def test_invalid_cursor(store: TrajectoryStore, cursor: str) -> None:
    with pytest.raises(ValueError, match="invalid cursor"):
        store.list(cursor=cursor)


def test_export_streams_full_trajectories_without_blocking_writers(store: TrajectoryStore, db_path: Path) -> None:
    ids = [start(store) for _ in range(5)]
    for i in ids:
        store.finish(i, status="ok", messages=tool_run_messages(), adapter="v3")
    store.add_feedback(ids[0], score=1.0, comment="good", caller="alice")
    stream = store.export(status="ok")
    first = next(stream)  # a read transaction is open now...
    assert first["id"] == ids[-1] and len(first["messages"]) == 10
    assert first["messages"][6]["completion_token_ids"] == [7, 8, 9]
    late = start(store)  # ...and writes still go through
    rest = list(stream)
    assert [t["id"] for t in rest] == ids[-2::-1]
    assert rest[-1]["feedback"][0]["comment"] == "good"
    assert late not in {t["id"] for t in rest}


# ---------------------------------------------------------------- feedback


def test_feedback(store: TrajectoryStore) -> None:
    traj_id = start(store)
    fb = store.add_feedback(traj_id, score=0.25, comment="close", caller="alice")
    assert fb["trajectory_id"] == traj_id and fb["score"] == 0.25 and isinstance(fb["id"], int)
    store.add_feedback(traj_id, score=1, comment=None, caller="admin")
    got = store.get(traj_id)["feedback"]
    assert [(f["score"], f["comment"], f["caller"]) for f in got] == [(0.25, "close", "alice"), (1.0, None, "admin")]


@pytest.mark.parametrize("score", [-0.01, 1.01, float("nan"), True, "1"])
def test_feedback_score_must_be_in_unit_interval(store: TrajectoryStore, score) -> None:
    traj_id = start(store)
    with pytest.raises(ValueError, match="score"):
        store.add_feedback(traj_id, score=score, comment=None, caller="alice")
    assert store.get(traj_id)["feedback"] == []


def test_feedback_on_unknown_trajectory(store: TrajectoryStore) -> None:
    with pytest.raises(NotFound) as e:
        store.add_feedback("t_0000000000000000000000", score=1.0, comment=None, caller="alice")
    assert isinstance(e.value, LookupError)


# ---------------------------------------------------------------- active adapter


def test_active_adapter_pointer(store: TrajectoryStore, db_path: Path) -> None:
    assert store.get_active_adapter() == (None, None)
    other = TrajectoryStore(db_path)  # e.g. the CLI in another process
    other.set_active_adapter("v4", db_path.parent / "adapters" / "v4")
    assert store.get_active_adapter() == ("v4", str(db_path.parent / "adapters" / "v4"))
    with pytest.raises(ValueError, match="both"):
        store.set_active_adapter("v5", None)
    store.set_active_adapter(None, None)
    assert other.get_active_adapter() == (None, None)
    other.close()


# ---------------------------------------------------------------- crash recovery (real processes)


def python(code: str, *args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


STARTER = """
    import sys
    from runtime.store import TrajectoryStore
    s = TrajectoryStore(sys.argv[1])
    print(s.start(caller="c", thread_id=None, request={}, metadata=None, request_key=None, model="m"), flush=True)
    sys.stdin.read()  # stay alive until the test closes stdin or kills us
"""


def test_recover_interrupted_marks_only_dead_writers(store: TrajectoryStore, db_path: Path) -> None:
    doomed = python(STARTER, str(db_path), stdin=subprocess.PIPE)
    alive = python(STARTER, str(db_path), stdin=subprocess.PIPE)
    try:
        doomed_id = doomed.stdout.readline().strip()
        alive_id = alive.stdout.readline().strip()
        assert doomed_id.startswith("t_") and alive_id.startswith("t_"), doomed.stderr.read()
        mine = start(store)
        doomed.send_signal(signal.SIGKILL)
        # Not reaped yet: a zombie still has its /proc entry, but will never write again.
        deadline = time.monotonic() + 30
        while Path(f"/proc/{doomed.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)

        assert store.recover_interrupted() == 1
        doomed.wait(timeout=30)
        t = store.get(doomed_id)
        assert t["status"] == "interrupted" and t["finished_at"] is not None and "exited" in t["error"]
        assert store.get(alive_id)["status"] == "running"  # a live writer, e.g. the learner
        assert store.get(mine)["status"] == "running"  # our own
        assert store.recover_interrupted() == 0
    finally:
        alive.kill()
        alive.wait(timeout=30)
    assert store.recover_interrupted() == 1
    assert store.get(alive_id)["status"] == "interrupted"


def test_recover_interrupted_detects_pid_reuse_and_previous_boots(store: TrajectoryStore, db_path: Path) -> None:
    boot, pid, start_ticks = store.writer.split(":")
    db = schema.connect(db_path)
    cases = {
        "reused_pid": f"{boot}:{pid}:{int(start_ticks) - 1}",  # our pid, another start: our previous life
        "old_boot": f"{'0' * 12}:{pid}:{start_ticks}",
        "unknown_format": "someone-else",  # can't tell: leave alone
    }
    ids = {}
    for name, writer in cases.items():
        ids[name] = start(store)
        db.execute("UPDATE trajectories SET writer = ? WHERE id = ?", [writer, ids[name]])
    assert store.recover_interrupted() == 2
    assert {n: store.get(i)["status"] for n, i in ids.items()} == {
        "reused_pid": "interrupted", "old_boot": "interrupted", "unknown_format": "running",
    }


# ---------------------------------------------------------------- concurrency


WRITER = """
    import sys, time
    from pathlib import Path
    from runtime.store import TrajectoryStore
    s = TrajectoryStore(sys.argv[1])
    go = Path(sys.argv[2])
    while not go.exists():
        time.sleep(0.001)
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "generated": True,
            "completion_token_ids": list(range(50))}]
    for i in range(int(sys.argv[3])):
        t = s.start(caller=sys.argv[4], thread_id=None, request={"i": i}, metadata=None, request_key=None, model="m")
        s.finish(t, status="ok", messages=msgs, final_answer="a")
        s.add_feedback(t, score=1.0, comment=None, caller=sys.argv[4])
    print("done", flush=True)
"""


def test_two_processes_write_concurrently(db_path: Path, tmp_path: Path) -> None:
    TrajectoryStore(db_path).close()  # migrate once, so both children race on writes, not DDL
    go = tmp_path / "go"
    n = 150
    procs = [python(WRITER, str(db_path), str(go), str(n), name) for name in ("p1", "p2")]
    reader = TrajectoryStore(db_path)
    go.touch()
    reads = 0
    while any(p.poll() is None for p in procs):  # read while they write: WAL readers never block
        reader.list(limit=10)
        reads += 1
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert "locked" not in err and out.strip() == "done"
    assert reader.count(caller="p1") == n and reader.count(caller="p2") == n
    assert reader.count(status="ok") == 2 * n
    assert reads > 0
    reader.close()


def test_one_store_shared_by_threads(store: TrajectoryStore) -> None:
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for i in range(30):
                t = start(store, caller=f"th{k}")
                store.finish(t, status="ok", messages=[{"role": "user", "content": str(i)}])
                store.list(caller=f"th{k}", limit=5)
                store.get(t)
                store.get_active_adapter()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert store.count(status="ok") == 120


def test_finish_of_a_ten_message_trajectory_is_fast(store: TrajectoryStore) -> None:
    # Not a benchmark: a guard against finish() degrading to one transaction (one fsync) per message.
    ids = [start(store) for _ in range(20)]
    t0 = time.perf_counter()
    for i in ids:
        store.finish(i, status="ok", messages=tool_run_messages())
    assert (time.perf_counter() - t0) / len(ids) < 0.05


def test_closed_store_raises_clearly(db_path: Path) -> None:
    s = TrajectoryStore(db_path)
    s.close()
    s.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        start(s)
    with pytest.raises(RuntimeError, match="closed"):
        s.get_active_adapter()
