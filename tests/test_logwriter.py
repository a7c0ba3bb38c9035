"""TrajectoryLog: async writes through one writer thread, committed before they return."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from runtime.logwriter import LogClosed, TrajectoryLog
from runtime.store import NotFound, TrajectoryStore

START = dict(caller="alice", thread_id=None, request={"messages": []}, metadata=None, request_key="k", model="m")
MESSAGES = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "generated": True,
                                                "completion_token_ids": [1, 2]}]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "hone.db"


class SlowStore(TrajectoryStore):
    """Records which thread writes, and can be slowed down so that writes pile up in the queue."""

    delay = 0.0

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.write_threads: set[int] = set()

    def start(self, **kwargs):
        self.write_threads.add(threading.get_ident())
        time.sleep(self.delay)
        return super().start(**kwargs)

    def finish(self, traj_id, **kwargs):
        self.write_threads.add(threading.get_ident())
        time.sleep(self.delay)
        return super().finish(traj_id, **kwargs)


def test_concurrent_writes_are_committed_when_awaited(db_path: Path) -> None:
    store = SlowStore(db_path)
    observer = TrajectoryStore(db_path)  # another connection: sees only committed data

    async def one_run(log: TrajectoryLog, i: int) -> str:
        traj_id = await log.start(**START | {"caller": f"c{i % 3}"})
        assert observer.get(traj_id)["status"] == "running"
        await log.finish(traj_id, status="ok", messages=MESSAGES, final_answer="a", adapter=None, latency_ms=1.0)
        t = observer.get(traj_id)
        assert t["status"] == "ok" and len(t["messages"]) == 2  # durable before finish() returned
        return traj_id

    async def main() -> list[str]:
        log = TrajectoryLog(store)
        try:
            return await asyncio.gather(*(one_run(log, i) for i in range(200)))
        finally:
            await log.aclose()

    loop_thread = threading.get_ident()
    ids = asyncio.run(main())
    assert len(set(ids)) == 200
    assert observer.count(status="ok") == 200
    # Every write ran on the one writer thread, never on the event loop's thread.
    assert len(store.write_threads) == 1 and loop_thread not in store.write_threads
    observer.close()
    store.close()


def test_writer_errors_reach_the_caller_and_the_writer_survives(db_path: Path) -> None:
    async def main() -> None:
        async with TrajectoryLog(db_path) as log:
            with pytest.raises(NotFound):
                await log.finish("t_0000000000000000000000", status="ok", messages=[])
            traj_id = await log.start(**START)
            with pytest.raises(ValueError, match="unknown final status"):
                await log.finish(traj_id, status="bogus", messages=[])
            with pytest.raises(ValueError, match="score"):
                await log.add_feedback(traj_id, score=3.0, comment=None, caller="alice")
            with pytest.raises(TypeError):
                await log.start(nonsense=True)
            # Still writing after four failures:
            await log.finish(traj_id, status="ok", messages=MESSAGES)
            fb = await log.add_feedback(traj_id, score=1.0, comment="yes", caller="alice")
            assert fb["score"] == 1.0
            t = await log.get(traj_id)
            assert t["status"] == "ok" and t["feedback"][0]["comment"] == "yes"

    asyncio.run(main())


def test_close_drains_queued_writes_then_refuses_new_ones(db_path: Path) -> None:
    store = SlowStore(db_path)
    store.delay = 0.005

    async def main() -> None:
        log = TrajectoryLog(store)
        tasks = [asyncio.ensure_future(log.start(**START)) for _ in range(40)]
        await asyncio.sleep(0)  # let every task queue its write
        assert not all(t.done() for t in tasks)  # the queue is not empty when close() starts
        log.close()
        assert store.count() == 40  # close() returned only once the whole queue was committed
        ids = await asyncio.gather(*tasks)
        assert all(store.get(i)["status"] == "running" for i in ids)
        with pytest.raises(LogClosed, match="closed"):
            await log.start(**START)
        log.close()  # idempotent
        await log.aclose()
        assert log.closed

    asyncio.run(main())
    assert store.count() == 40
    store.close()


def test_cancelled_caller_does_not_drop_the_write(db_path: Path) -> None:
    store = SlowStore(db_path)
    store.delay = 0.05

    async def main() -> None:
        log = TrajectoryLog(store)
        blocker = asyncio.ensure_future(log.start(**START))  # keeps the writer busy...
        victim = asyncio.ensure_future(log.start(**START | {"caller": "gone"}))  # ...while this one waits
        await asyncio.sleep(0.01)
        victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        await blocker
        await log.aclose()

    asyncio.run(main())
    assert store.count(caller="gone") == 1
    store.close()


def test_reads(db_path: Path) -> None:
    async def main() -> None:
        async with TrajectoryLog(db_path) as log:
            ids = [await log.start(**START | {"caller": c}) for c in ("a", "b", "a")]
            await log.set_active_adapter("v2", "/adapters/v2")
            rows, cursor = await log.list(caller="a", limit=1)
            assert [r["id"] for r in rows] == [ids[2]] and cursor is not None
            rows, cursor = await log.list(caller="a", limit=1, cursor=cursor)
            assert [r["id"] for r in rows] == [ids[0]] and cursor is None
            assert await log.count() == 3
            assert await log.get("t_0000000000000000000000") is None
            assert await log.get_active_adapter() == ("v2", "/adapters/v2")
            with pytest.raises(ValueError, match="invalid cursor"):
                await log.list(cursor="nope")
        with pytest.raises(LogClosed):
            await log.get(ids[0])  # the log opened its store from a path, so it closed it too

    asyncio.run(main())


def test_log_does_not_close_a_store_it_was_given(db_path: Path) -> None:
    store = TrajectoryStore(db_path)
    log = TrajectoryLog(store)
    log.close()
    assert store.count() == 0  # still open
    store.close()
