"""learner.labels: who says a run succeeded, on plain dicts and on a real trajectory database."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from learner.labels import FAILURE_STATUSES, Label, apply_labels, label_all, label_for
from learner.registry import Registry
from runtime import schema
from runtime.store import TrajectoryStore

# ---------------------------------------------------------------- label_for (pure)


def traj(status: str = "ok", expected=None, answer: str | None = "42", check: str | None = None,
         metadata: dict | str | None = None) -> dict:
    if metadata is None:
        metadata = {}
        if expected is not None:
            metadata["expected_answer"] = expected
        if check is not None:
            metadata["check"] = check
    return {"status": status, "metadata": metadata, "final_answer": answer}


def fb(*scores: float) -> list[dict]:
    return [{"id": i + 1, "score": s} for i, s in enumerate(scores)]


def test_feedback_beats_heuristics_and_verifier() -> None:
    # the verifier says success, the user says failure: the user wins
    assert label_for(traj(expected=42, answer="42"), fb(0.0)) == Label("failure", "feedback", 0.0)
    # the run hit the step limit, the user liked it anyway
    assert label_for(traj(status="step_limit"), fb(1.0)) == Label("success", "feedback", 1.0)
    # even an interrupted run can be judged by a person
    assert label_for(traj(status="interrupted"), fb(0.8)) == Label("success", "feedback", 0.8)


def test_latest_feedback_by_id_wins_whatever_the_list_order() -> None:
    rows = [{"id": 7, "score": 1.0}, {"id": 9, "score": 0.0}, {"id": 8, "score": 1.0}]
    assert label_for(traj(), rows) == Label("failure", "feedback", 0.0)
    rows = [{"id": 9, "score": 0.9}, {"id": 3, "score": 0.0}]
    assert label_for(traj(), rows) == Label("success", "feedback", 0.9)


@pytest.mark.parametrize("score, label", [(0.5, "success"), (0.49, "failure"), (0.51, "success"),
                                          (0, "failure"), (1, "success")])
def test_feedback_threshold_is_half_inclusive(score: float, label: str) -> None:
    got = label_for(traj(), fb(score))
    assert got == Label(label, "feedback", float(score))
    assert isinstance(got.score, float)


@pytest.mark.parametrize("status", FAILURE_STATUSES)
def test_failure_statuses_are_heuristic_failures(status: str) -> None:
    # even with an expected answer the final reply matches: the heuristic comes first
    assert label_for(traj(status=status, expected=42, answer="42"), []) == Label("failure", "heuristic", 0.0)


def test_failure_statuses_are_the_four() -> None:
    assert set(FAILURE_STATUSES) == {"tool_error", "parse_error", "step_limit", "engine_error"}


@pytest.mark.parametrize("status", ["running", "interrupted"])
def test_running_and_interrupted_are_unlabelled(status: str) -> None:
    assert label_for(traj(status=status, expected=42, answer="42"), []) is None


def test_ok_without_expected_answer_is_unlabelled() -> None:
    assert label_for(traj(), []) is None
    assert label_for({"status": "ok", "metadata": None, "final_answer": "x"}, []) is None
    assert label_for({"status": "ok", "final_answer": "x"}, []) is None
    assert label_for(traj(metadata={"expected_answer": None}), []) is None


def test_verifier_success_and_failure() -> None:
    assert label_for(traj(expected=42, answer="It is 42."), []) == Label("success", "verifier", 1.0)
    assert label_for(traj(expected=42, answer="It is 41."), []) == Label("failure", "verifier", 0.0)
    assert label_for(traj(expected="Paris", answer="paris!"), []) == Label("success", "verifier", 1.0)
    assert label_for(traj(expected="Paris", answer="paris!", check="exact"), []) == Label("failure", "verifier", 0.0)
    assert label_for(traj(expected=42, answer=None), []) == Label("failure", "verifier", 0.0)


def test_verifier_reads_metadata_stored_as_json_text() -> None:
    t = traj(metadata=json.dumps({"expected_answer": "1,234"}), answer="1234")
    assert label_for(t, []) == Label("success", "verifier", 1.0)


@pytest.mark.parametrize("metadata", [
    {"expected_answer": "Paris", "check": "numeric"},  # not a number
    {"expected_answer": 42, "check": "fuzzy"},  # unknown check
    {"expected_answer": ""},  # empty: would be "contained" in every reply
])
def test_unusable_expected_answer_is_unlabelled(metadata: dict) -> None:
    assert label_for(traj(metadata=metadata, answer="Paris 42"), []) is None


# ---------------------------------------------------------------- apply_labels on a real database


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "hone.db"


@pytest.fixture
def store(db_path: Path):
    s = TrajectoryStore(db_path)
    yield s
    s.close()


@pytest.fixture
def db(store: TrajectoryStore, db_path: Path):
    conn = schema.connect(db_path)
    yield conn
    conn.close()


GEN = {"role": "assistant", "content": "x", "generated": True}


def run(store: TrajectoryStore, *, status: str | None = "ok", expected=None, answer: str = "42",
        check: str | None = None) -> str:
    meta = {} if expected is None else {"expected_answer": expected}
    if check:
        meta["check"] = check
    tid = store.start(caller="alice", thread_id=None, request={"input": "q"}, metadata=meta or None,
                      request_key="k", model="hone-base")
    if status is not None:
        store.finish(tid, status=status, messages=[{"role": "user", "content": "q"}, GEN], final_answer=answer)
    return tid


def row(db, tid: str) -> dict:
    cur = db.execute("SELECT label, label_source, label_score, labeled_at FROM trajectories WHERE id = ?", [tid])
    return dict(zip([d[0] for d in cur.description], cur.fetchone()))


def test_apply_labels_writes_label_source_score_and_time(store, db) -> None:
    ok = run(store, expected=42, answer="42")
    wrong = run(store, expected=42, answer="41")
    tool = run(store, status="tool_error")
    plain = run(store)  # ok, nothing to check against
    liked = run(store)
    store.add_feedback(liked, score=0.75, comment=None, caller="alice")
    t0 = time.time()
    counts = apply_labels(db)
    t1 = time.time()
    assert counts == {"success": 2, "failure": 2, "unlabelled": 1}
    assert {k: v for k, v in row(db, ok).items() if k != "labeled_at"} == \
        {"label": "success", "label_source": "verifier", "label_score": 1.0}
    assert {k: v for k, v in row(db, wrong).items() if k != "labeled_at"} == \
        {"label": "failure", "label_source": "verifier", "label_score": 0.0}
    assert {k: v for k, v in row(db, tool).items() if k != "labeled_at"} == \
        {"label": "failure", "label_source": "heuristic", "label_score": 0.0}
    assert {k: v for k, v in row(db, liked).items() if k != "labeled_at"} == \
        {"label": "success", "label_source": "feedback", "label_score": 0.75}
    assert {k: v for k, v in row(db, plain).items() if k != "labeled_at"} == \
        {"label": None, "label_source": None, "label_score": None}
    for tid in (ok, wrong, tool, plain, liked):  # examined, even when nothing could be said
        assert t0 <= row(db, tid)["labeled_at"] <= t1
    # the store reads the same values
    assert store.get(ok)["label"] == "success"
    assert store.count(label="failure") == 2


def test_apply_labels_is_idempotent(store, db) -> None:
    a = run(store, expected=1, answer="1")
    run(store)
    assert apply_labels(db) == {"success": 1, "failure": 0, "unlabelled": 1}
    stamp = row(db, a)["labeled_at"]
    assert apply_labels(db) == {"success": 0, "failure": 0, "unlabelled": 0}
    assert row(db, a)["labeled_at"] == stamp  # not rewritten


def test_feedback_after_labelling_flips_the_label_each_time(store, db) -> None:
    tid = run(store, expected=42, answer="42")
    assert apply_labels(db)["success"] == 1
    assert row(db, tid)["label_source"] == "verifier"

    store.add_feedback(tid, score=0.0, comment="wrong after all", caller="alice")
    assert apply_labels(db) == {"success": 0, "failure": 1, "unlabelled": 0}
    assert {k: v for k, v in row(db, tid).items() if k != "labeled_at"} == \
        {"label": "failure", "label_source": "feedback", "label_score": 0.0}
    assert apply_labels(db) == {"success": 0, "failure": 0, "unlabelled": 0}

    store.add_feedback(tid, score=1.0, comment="no, it was right", caller="alice")
    assert apply_labels(db) == {"success": 1, "failure": 0, "unlabelled": 0}
    assert {k: v for k, v in row(db, tid).items() if k != "labeled_at"} == \
        {"label": "success", "label_source": "feedback", "label_score": 1.0}

    # the same score again changes nothing: nothing to relabel
    store.add_feedback(tid, score=1.0, comment=None, caller="alice")
    assert apply_labels(db) == {"success": 0, "failure": 0, "unlabelled": 0}


def test_feedback_on_an_unlabelled_run_labels_it(store, db) -> None:
    tid = run(store, status="interrupted")
    assert apply_labels(db) == {"success": 0, "failure": 0, "unlabelled": 1}
    store.add_feedback(tid, score=0.6, comment=None, caller="bob")
    assert apply_labels(db) == {"success": 1, "failure": 0, "unlabelled": 0}
    assert row(db, tid)["label_source"] == "feedback"


def test_running_trajectories_wait_until_finished(store, db) -> None:
    tid = run(store, status=None, expected=7)
    assert apply_labels(db) == {"success": 0, "failure": 0, "unlabelled": 0}
    assert row(db, tid) == {"label": None, "label_source": None, "label_score": None, "labeled_at": None}
    store.finish(tid, status="ok", messages=[GEN], final_answer="7")
    assert apply_labels(db) == {"success": 1, "failure": 0, "unlabelled": 0}
    assert row(db, tid)["label"] == "success"


@pytest.mark.parametrize("n, batch", [(5, 2), (4, 2), (1, 1), (0, 3)])
def test_batches_cover_every_row(store, db, n: int, batch: int) -> None:
    ids = [run(store, expected=i, answer=str(i if i % 2 == 0 else -1)) for i in range(n)]
    counts = apply_labels(db, batch=batch)
    assert counts == {"success": (n + 1) // 2, "failure": n // 2, "unlabelled": 0}
    assert [row(db, t)["label"] for t in ids] == ["success" if i % 2 == 0 else "failure" for i in range(n)]
    assert not db.conn.in_transaction


def test_label_all_uses_the_registry_connection(store, db_path: Path) -> None:
    tid = run(store, expected="Paris", answer="It's Paris.")
    reg = Registry(db_path)
    try:
        assert label_all(reg) == {"success": 1, "failure": 0, "unlabelled": 0}
        assert store.get(tid)["label"] == "success"
        assert reg.count_labelled_since(0.0) == 1
    finally:
        reg.close()
