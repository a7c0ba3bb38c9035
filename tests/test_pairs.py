"""learner.tasks, learner.sequences and learner.pairs: from labelled trajectories in a real SQLite log
to token-exact preference pairs, and the tasks that need exploring."""

from __future__ import annotations

import importlib.util
import itertools
import hashlib
import json
from pathlib import Path

import pytest

from learner.labels import apply_labels
from learner.pairs import Groups, build_pairs, collect, has_contrast, tasks_to_explore, validation_tasks
from learner.sequences import SequenceError, trajectory_sequence
from learner.tasks import Task, TaskFileError, is_validation, load_task_file, task_from_trajectory, task_key
from learner.types import TokenSequence
from runtime import schema
from runtime.store import TrajectoryStore
from tools.specs import TOOL_SPECS

VAL = 0.5  # val_fraction used below: plenty of keys on both sides


def keys(side: str, n: int, prefix: str = "task") -> list[str]:
    """The first n task ids of the form prefix-i on the given side of the split."""
    want_val = side == "validation"
    return list(itertools.islice((k for k in (f"{prefix}-{i}" for i in itertools.count())
                                  if is_validation(k, VAL) == want_val), n))


# ================================================================ tasks


def test_task_key_prefers_task_id() -> None:
    assert task_key({"task_id": "t1", "request_key": "abc"}) == "t1"
    assert task_key({"task_id": 17, "request_key": "abc"}) == "17"
    assert task_key({"task_id": None, "request_key": "abc"}) == "req:abc"
    assert task_key({"task_id": "", "request_key": "abc"}) == "req:abc"
    assert task_key({"request_key": "abc"}) == "req:abc"


def test_is_validation_is_deterministic_and_near_the_fraction() -> None:
    ks = [f"key-{i}" for i in range(1000)]
    first = [is_validation(k, 0.2) for k in ks]
    assert first == [is_validation(k, 0.2) for k in ks]
    assert 0.15 <= sum(first) / len(ks) <= 0.25
    assert not any(is_validation(k, 0.0) for k in ks)
    assert all(is_validation(k, 1.0) for k in ks)
    # monotone in the fraction: a validation key stays validation when the fraction grows
    assert all(is_validation(k, 0.5) for k, v in zip(ks, first) if v)


def row(**kw) -> dict:
    base = {"id": "t_x", "task_id": None, "request_key": "rk", "thread_id": None,
            "metadata": {"expected_answer": 42}, "request": {"input": "What is 6*7?"}}
    base.update(kw)
    return base


def test_task_from_trajectory_input_request() -> None:
    t = task_from_trajectory(row(metadata={"expected_answer": 42, "task_id": "m1", "topic": "math"}, task_id="m1"))
    assert t == Task("m1", ({"role": "user", "content": "What is 6*7?"},), 42, "numeric")
    assert t.metadata == {"topic": "math"}  # task_id / expected_answer / check are not copied twice
    assert t.run_metadata(cycle_id=3) == {"topic": "math", "task_id": "m1", "expected_answer": 42,
                                          "check": "numeric", "cycle_id": 3}
    trial = task_from_trajectory(row(metadata={"expected_answer": 42, "task_id": "m1", "topic": "math",
                                               "cycle_id": 2, "explore_operation": "/"}, task_id="m1"))
    assert trial.metadata == {"topic": "math"}  # a free re-run of a task last seen in a trial is not a trial


def test_task_from_trajectory_messages_request_and_json_text() -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Capital of France?"}]
    t = task_from_trajectory(row(request=json.dumps({"messages": msgs}),
                                 metadata=json.dumps({"expected_answer": "Paris", "check": "exact"})))
    assert t == Task("req:rk", tuple(msgs), "Paris", "exact")
    assert t.run_metadata() == {"task_id": "req:rk", "expected_answer": "Paris", "check": "exact"}


def test_a_run_that_found_stored_data_is_re_run_from_it() -> None:
    from learner.tasks import fingerprint

    recall = row(request={"input": "Get gym_pin from storage."}, metadata={"expected_answer": 7807},
                 storage_state=json.dumps({"kv": {"gym_pin": "7807"}}))
    t = task_from_trajectory(recall)
    assert t.storage == {"gym_pin": "7807"}
    assert task_from_trajectory({**recall, "storage_state": {"kv": {}}}).storage is None  # a fresh namespace is empty
    assert task_from_trajectory({**recall, "storage_state": None}).storage is None  # not recorded (before v4)
    other = task_from_trajectory({**recall, "storage_state": {"kv": {"gym_pin": "1111"}}})
    plain = task_from_trajectory({**recall, "storage_state": None})
    # a gate result recorded for the task from one state is not reused for another
    assert len({fingerprint(t), fingerprint(other), fingerprint(plain)}) == 3


@pytest.mark.parametrize("kw", [
    {"thread_id": "th1"},  # a thread turn cannot be re-run on its own
    {"metadata": {}},  # no expected answer
    {"metadata": None},
    {"metadata": {"expected_answer": None}},
    {"request": {"messages": []}},
    {"request": {}},
    {"metadata": {"expected_answer": 42, "check": "fuzzy"}},  # unknown check
    {"metadata": {"expected_answer": "Paris", "check": "numeric"}},  # would raise CheckError in the gate
    {"metadata": {"expected_answer": ""}},  # empty: every reply would "contain" it
    {"storage_state": {"omitted": "over storage_snapshot_max_bytes=4096"}},  # its starting state is unknown
])
def test_task_from_trajectory_none(kw: dict) -> None:
    assert task_from_trajectory(row(**kw)) is None


def write(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_task_file(tmp_path: Path) -> None:
    p = write(tmp_path / "tasks.jsonl",
              '{"id": "a", "question": "6*7?", "answer": 42}',
              "",
              "   ",
              '{"id": 2, "question": "Capital of France?", "answer": "Paris", "check": "exact"}',
              '{"id": "c", "question": "1,000 + 234?", "answer": "1,234", "extra": "ignored"}')
    tasks = load_task_file(p)
    assert tasks == [
        Task("file:a", ({"role": "user", "content": "6*7?"},), 42, "numeric"),
        Task("file:2", ({"role": "user", "content": "Capital of France?"},), "Paris", "exact"),
        Task("file:c", ({"role": "user", "content": "1,000 + 234?"},), "1,234", "numeric"),
    ]


@pytest.mark.parametrize("lines, line_no, fragment", [
    (['{"id": "a", "question": "q", "answer": 1}', '{"id": "b", "question": "q", "answer": '], 2, "not valid JSON"),
    (['{"id": "a", "question": "q"}'], 1, "missing answer"),
    (['{"question": "q"}'], 1, "missing id, answer"),
    (['["a", "q", 1]'], 1, "expected a JSON object"),
    (['{"id": "a", "question": "  ", "answer": 1}'], 1, "question must be a non-empty string"),
    (['{"id": "a", "question": "q", "answer": 1, "check": "regex"}'], 1, "check must be one of"),
    (['{"id": "a", "question": "q", "answer": 1}', "", '{"id": "a", "question": "r", "answer": 2}'], 3,
     "duplicate id 'a'"),
    (['{"id": "a", "question": "q", "answer": "Paris", "check": "numeric"}'], 1, "cannot be checked"),
    (['{"id": "a", "question": "q", "answer": null}'], 1, "cannot be checked"),
    (['{"id": "a", "question": "q", "answer": ""}'], 1, "cannot be checked"),
])
def test_load_task_file_errors_name_the_line(tmp_path: Path, lines: list[str], line_no: int, fragment: str) -> None:
    p = write(tmp_path / "tasks.jsonl", *lines)
    with pytest.raises(TaskFileError) as e:
        load_task_file(p)
    assert f"{p}:{line_no}: " in str(e.value)
    assert fragment in str(e.value)


def test_load_task_file_unreadable(tmp_path: Path) -> None:
    with pytest.raises(TaskFileError, match="cannot read"):
        load_task_file(tmp_path / "missing.jsonl")
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"id": "a", "question": "caf\xe9", "answer": 1}\n')
    with pytest.raises(TaskFileError, match="cannot read"):
        load_task_file(bad)


# ================================================================ sequences


def gen(prompt: list[int] | None, completion: list[int] | None, content: str = "x", **kw) -> dict:
    return {"role": "assistant", "content": content, "generated": True, "prompt_token_ids": prompt,
            "completion_token_ids": completion, **kw}


CALL = [{"id": "c1", "type": "function", "function": {"name": "python", "arguments": '{"code": "6*7"}'}}]


def two_step_messages(drift: bool = False) -> list[dict]:
    return [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "6*7?"},
        gen([1, 2, 3], [10, 11], content="", tool_calls=CALL),
        {"role": "tool", "content": "42", "tool_call_id": "c1", "name": "python"},
        # step 2's prompt = step 1's prompt + completion + the tool result (20, 21)
        gen([1, 2, 3, 10, 99 if drift else 11, 20, 21], [30, 31, 32], content="42"),
    ]


def logged(store: TrajectoryStore, messages: list[dict], *, status: str = "ok") -> dict:
    tid = store.start(caller="a", thread_id=None, request={"input": "6*7?"}, metadata=None, request_key="k",
                      model="hone-base")
    store.finish(tid, status=status, messages=messages, final_answer="42")
    return store.get(tid)


@pytest.fixture
def store(tmp_path: Path):
    s = TrajectoryStore(tmp_path / "hone.db")
    yield s
    s.close()


def test_sequence_from_logged_ids(store: TrajectoryStore) -> None:
    t = logged(store, two_step_messages())
    seq = trajectory_sequence(t)
    assert seq == TokenSequence((1, 2, 3, 10, 11, 20, 21, 30, 31, 32), (0, 0, 0, 1, 1, 0, 0, 1, 1, 1), t["id"])
    assert seq.n_generated == 5


def test_history_assistant_turns_are_context(store: TrajectoryStore) -> None:
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},  # client history
            {"role": "user", "content": "6*7?"}, gen([5, 6, 7, 8], [9])]
    seq = trajectory_sequence(logged(store, msgs))
    assert seq.ids == (5, 6, 7, 8, 9) and seq.mask == (0, 0, 0, 0, 1)


def test_a_retokenized_completion_tail_is_trimmed_not_trained(store: TrajectoryStore) -> None:
    # step 1 generated 10, 11; step 2 was served 10, 99 (the same text re-rendered as other tokens)
    t = logged(store, two_step_messages(drift=True))
    seq = trajectory_sequence(t)
    # 11 is left out: 99 follows 10 as context, exactly what step 2 was served; 30-32 are trained in it
    assert seq.ids == (1, 2, 3, 10, 99, 20, 21, 30, 31, 32) and seq.mask == (0, 0, 0, 1, 0, 0, 0, 1, 1, 1)
    assert seq.untrained == 1 and seq.n_generated == 4
    assert trajectory_sequence(logged(store, two_step_messages())).untrained == 0


def test_drift_raises_when_excluding(store: TrajectoryStore) -> None:
    t = logged(store, two_step_messages(drift=True))
    with pytest.raises(SequenceError) as e:
        trajectory_sequence(t, on_drift="exclude")
    assert e.value.kind == "drift"
    assert "step 2" in str(e.value) and "first difference at token 4" in str(e.value)
    with pytest.raises(ValueError, match="on_drift must be one of trim, exclude"):
        trajectory_sequence(t, on_drift="keep")


def test_drift_before_the_previous_completion_is_excluded_even_when_trimming(store: TrajectoryStore) -> None:
    # step 2's prompt re-rendered the history (token 2 of the system prompt), not step 1's output:
    # nothing generated explains it, so the run would train on a context the model never saw
    msgs = [{"role": "user", "content": "q"}, gen([1, 2, 3], [4, 5]), gen([1, 7, 3, 4, 5, 8], [6])]
    with pytest.raises(SequenceError) as e:
        trajectory_sequence(logged(store, msgs))
    assert e.value.kind == "drift" and "first difference at token 1" in str(e.value)


def test_a_prompt_that_drops_the_end_of_the_completion_is_trimmed(store: TrajectoryStore) -> None:
    msgs = [{"role": "user", "content": "q"}, gen([1, 2, 3], [4, 5]), gen([1, 2, 3, 4], [6])]
    seq = trajectory_sequence(logged(store, msgs))
    assert seq.ids == (1, 2, 3, 4, 6) and seq.mask == (0, 0, 0, 1, 1) and seq.untrained == 1
    with pytest.raises(SequenceError):
        trajectory_sequence(logged(store, msgs), on_drift="exclude")


def test_a_completion_retokenized_from_its_first_token_keeps_the_run(store: TrajectoryStore) -> None:
    msgs = [{"role": "user", "content": "q"}, gen([1, 2, 3], [4, 5]), gen([1, 2, 3, 9, 9, 8], [6, 7])]
    seq = trajectory_sequence(logged(store, msgs))
    assert seq.ids == (1, 2, 3, 9, 9, 8, 6, 7) and seq.mask == (0, 0, 0, 0, 0, 0, 1, 1) and seq.untrained == 2


def test_no_generated_steps(store: TrajectoryStore) -> None:
    t = logged(store, [{"role": "user", "content": "q"}], status="engine_error")
    with pytest.raises(SequenceError) as e:
        trajectory_sequence(t)
    assert e.value.kind == "no_steps"


def test_missing_ids_without_a_usable_model_is_a_render_error(store: TrajectoryStore, tmp_path: Path) -> None:
    msgs = [{"role": "user", "content": "q"}, gen([1, 2], [3]), gen(None, None)]  # one step lacks ids
    with pytest.raises(SequenceError) as e:
        trajectory_sequence(logged(store, msgs), model_dir=tmp_path / "no-model-here")
    assert e.value.kind == "render"


TEST_MODEL_DIR = Path(__file__).resolve().parent.parent / ".hone-test" / "model"


def test_rendering_fallback_masks_exactly_the_assistant_turns(store: TrajectoryStore) -> None:
    """Runs logged without token ids are re-rendered with the real template and tokenizer (~4 s)."""
    from runtime import model as M
    from runtime import rendering as R

    if importlib.util.find_spec(M.GGUF_MODULE) is None:
        pytest.skip(f"{M.GGUF_PACKAGE} not installed: no prepared model")
    model_dir = M.prepare_model(TEST_MODEL_DIR, progress=lambda m: None)
    msgs = [{"role": "system", "content": "You are hone."}, {"role": "user", "content": "Run print(1)"},
            {"role": "assistant", "content": "", "tool_calls": CALL, "generated": True},
            {"role": "tool", "content": "1", "tool_call_id": "c1", "name": "python"},
            {"role": "assistant", "content": "It printed 1.", "generated": True}]
    seq = trajectory_sequence(logged(store, msgs), model_dir=model_dir)
    tok = R.load_tokenizer(model_dir)
    gen_text = tok.decode([i for i, m in zip(seq.ids, seq.mask) if m])
    ctx_text = tok.decode([i for i, m in zip(seq.ids, seq.mask) if not m])
    assert gen_text == ('<tool_call>\n{"name": "python", "arguments": {"code": "6*7"}}\n</tool_call><|im_end|>'
                        "It printed 1.<|im_end|>")
    assert "Run print(1)" in ctx_text and "<tool_response>\n1\n</tool_response>" in ctx_text
    assert "It printed" not in ctx_text and '"arguments": {"code": "6*7"}' not in ctx_text
    # the whole sequence is the rendered conversation, up to the last <|im_end|>
    plain = [{k: v for k, v in m.items() if k != "generated"} for m in msgs]
    full = R.render_ids(plain, TOOL_SPECS, model_dir, add_generation_prompt=False)
    assert list(seq.ids) == full[: len(seq.ids)] and len(full) - len(seq.ids) <= 1  # at most a final "\n"


# ================================================================ pairs: a real log


class Log:
    """Trajectories in a real store, labelled by the real verifier (expected 42)."""

    def __init__(self, store: TrajectoryStore, db_path: Path) -> None:
        self.store = store
        self.db = schema.connect(db_path)
        self._tok = itertools.count(1000)

    def run(self, key: str, ok: bool, *, source: str = "serve", thread_id: str | None = None,
            completion: list[int] | None = None, drift: bool = False, steps: bool = True,
            status: str = "ok", expected=42, call: list[dict] | None = None, question: str | None = None,
            **metadata) -> str:
        meta = {"task_id": key} if expected is None else {"task_id": key, "expected_answer": expected}
        meta.update(metadata)
        question = question or f"question {key}"
        tid = self.store.start(caller="a", thread_id=thread_id, request={"input": question},
                               metadata=meta, request_key=f"rk-{key}", source=source, model="hone-base")
        done = completion or [next(self._tok), next(self._tok)]
        msgs: list[dict] = [{"role": "user", "content": question}]
        if steps:
            msgs.append(gen([1, 2, 3], [7, 8], content="", tool_calls=call or CALL))
            msgs.append({"role": "tool", "content": "42", "tool_call_id": "c1", "name": "python"})
            msgs.append(gen([1, 2, 3, 7, 9 if drift else 8, 4], done, content="42" if ok else "0"))
        self.store.finish(tid, status=status, messages=msgs, final_answer="42" if ok else "0")
        return tid

    def label(self) -> None:
        apply_labels(self.db)

    def close(self) -> None:
        self.db.close()


@pytest.fixture
def log(store: TrajectoryStore, tmp_path: Path):
    lg = Log(store, tmp_path / "hone.db")
    yield lg
    lg.close()


def test_collect_groups_splits_and_filters(log: Log) -> None:
    (tk,) = keys("train", 1)
    (vk,) = keys("validation", 1)
    t1 = log.run(tk, True)
    t2 = log.run(tk, False, source="exploration")
    v1 = log.run(vk, False)
    log.run(tk, True, source="gate")
    log.run(tk, False, source="eval")
    log.run("unlabelled", True, expected=None)  # ok, nothing to judge it by
    log.label()
    g = collect(log.db, val_fraction=VAL)
    assert {k: [r["id"] for r in v] for k, v in g.train.items()} == {tk: [t2, t1]}  # newest first
    assert {k: [r["id"] for r in v] for k, v in g.validation.items()} == {vk: [v1]}
    assert g.counts() == {"train_tasks": 1, "validation_tasks": 1, "labelled_runs": 3}
    assert [r["label"] for r in g.train[tk]] == ["failure", "success"]
    assert g.train[tk][0]["source"] == "exploration"


def test_collect_never_puts_a_validation_key_in_train(log: Log) -> None:
    for k in keys("train", 6) + keys("validation", 6):
        log.run(k, True)
        log.run(k, False)
    log.label()
    g = collect(log.db, val_fraction=VAL)
    assert set(g.train) == set(keys("train", 6)) and set(g.validation) == set(keys("validation", 6))
    assert not any(is_validation(k, VAL) for k in g.train)
    assert all(is_validation(k, VAL) for k in g.validation)
    assert collect(log.db, val_fraction=VAL, limit=3).counts()["labelled_runs"] == 3


def test_collect_before_sees_the_log_as_it_was_then(log: Log) -> None:
    (tk,) = keys("train", 1)
    first = log.run(tk, True)
    later = log.run(tk, False)
    log.label()
    log.db.execute("UPDATE trajectories SET created_at = created_at + 100 WHERE id = ?", [later])
    then = log.db.execute("SELECT created_at FROM trajectories WHERE id = ?", [first]).fetchone()[0] + 1
    assert [r["id"] for r in collect(log.db, val_fraction=VAL, before=then).train[tk]] == [first]
    assert [r["id"] for r in collect(log.db, val_fraction=VAL).train[tk]] == [later, first]


def test_has_contrast() -> None:
    assert has_contrast([{"label": "success"}, {"label": "failure"}])
    assert not has_contrast([{"label": "success"}, {"label": "success"}])
    assert not has_contrast([{"label": "failure"}])
    assert not has_contrast([])


def test_tasks_to_explore_order_and_only_rerunnable(log: Log) -> None:
    a, b, c, d, e, f, g_ = keys("train", 7)
    for _ in range(2):
        log.run(a, False)  # all failed, 2 runs
    log.run(b, False)  # all failed, 1 run
    for _ in range(3):
        log.run(c, True)  # all succeeded, 3 runs
    log.run(d, True)  # all succeeded, 1 run
    log.run(e, True)
    log.run(e, False)  # has contrast: nothing to explore
    log.run(f, False, thread_id="th-1")  # a thread turn: not re-runnable
    tid = log.run(g_, True, expected=None)  # no expected answer: labelled by feedback only
    log.store.add_feedback(tid, score=1.0, comment=None, caller="a")
    for vk in keys("validation", 2):
        log.run(vk, False)
    log.label()
    groups = collect(log.db, val_fraction=VAL)
    assert set(groups.train) == {a, b, c, d, e, f, g_}
    got = [(t.key, n) for t, n in tasks_to_explore(groups)]
    assert got == [(b, 1), (d, 1), (a, 2), (c, 3)]  # least tried first, failure and success in turn
    task = tasks_to_explore(groups)[0][0]
    assert task.messages == ({"role": "user", "content": f"question {b}"},) and task.expected == 42


def test_validation_tasks_are_rerunnable_held_out_tasks(log: Log) -> None:
    v1, v2, v3 = keys("validation", 3)
    log.run(v1, True)
    log.run(v2, False)
    log.run(v3, False, thread_id="th")
    log.run(keys("train", 1)[0], False)
    log.label()
    tasks = validation_tasks(collect(log.db, val_fraction=VAL))
    assert sorted(t.key for t in tasks) == sorted([v1, v2])
    assert tasks == validation_tasks(collect(log.db, val_fraction=VAL))  # a stable order


def ids_of(pairs) -> list[tuple[str, str]]:
    return [(p.chosen.trajectory_id, p.rejected.trajectory_id) for p in pairs]


def test_build_pairs_success_by_failure_capped_per_task(log: Log) -> None:
    (k,) = keys("train", 1)
    s_old = log.run(k, True)
    f_old = log.run(k, False)
    f_mid = log.run(k, False)
    s_new = log.run(k, True)
    f_new = log.run(k, False)
    log.label()
    groups = collect(log.db, val_fraction=VAL)
    # good = [s_new, s_old], bad = [f_new, f_mid, f_old]; index sums 0, 1, 1, 2 are kept
    built = build_pairs(log.store, groups, per_task=4, max_pairs=100)
    assert built.excluded == {}
    assert sorted(ids_of(built.pairs)) == sorted([(s_new, f_new), (s_new, f_mid), (s_old, f_new), (s_new, f_old)])
    # newest first overall: by the newer trajectory of each pair (ties keep the per-task order)
    assert ids_of(built.pairs) == [(s_new, f_new), (s_old, f_new), (s_new, f_mid), (s_new, f_old)]
    assert all(p.group == k for p in built.pairs)
    p = built.pairs[0]
    assert p.chosen.ids[:6] == (1, 2, 3, 7, 8, 4) and p.chosen.mask == (0, 0, 0, 1, 1, 0, 1, 1)
    everything = build_pairs(log.store, groups, per_task=100, max_pairs=100)
    assert len(everything.pairs) == 6
    assert len(build_pairs(log.store, groups, per_task=1, max_pairs=100).pairs) == 1


def test_build_pairs_excludes_duplicates_drift_and_empty_runs(log: Log) -> None:
    (k,) = keys("train", 1)
    s1 = log.run(k, True, completion=[500, 501])
    log.run(k, True, completion=[500, 501])  # the same generation again (newer): excluded
    f1 = log.run(k, False)
    log.run(k, False, drift=True)
    log.run(k, False, steps=False, status="engine_error")  # heuristic failure, nothing generated
    log.label()
    built = build_pairs(log.store, collect(log.db, val_fraction=VAL), per_task=10, max_pairs=10, on_drift="exclude")
    assert built.excluded == {"duplicate": 1, "drift": 1, "no_steps": 1} and built.drift_trimmed == 0
    assert len(built.pairs) == 1
    trimmed = build_pairs(log.store, collect(log.db, val_fraction=VAL), per_task=10, max_pairs=10)
    assert trimmed.excluded == {"duplicate": 1, "no_steps": 1} and trimmed.drift_trimmed == 1
    assert len(trimmed.pairs) == 2
    (pair,) = built.pairs
    assert pair.rejected.trajectory_id == f1
    # which copy of the duplicate is kept: the newer one (rows are read newest first)
    assert pair.chosen.trajectory_id != s1
    assert pair.chosen.ids[-2:] == (500, 501)


def test_build_pairs_skips_tasks_whose_contrast_did_not_survive(log: Log) -> None:
    (k,) = keys("train", 1)
    log.run(k, True)
    log.run(k, False, drift=True)  # the only failure drifts: excluded, no pair for this task
    log.label()
    groups = collect(log.db, val_fraction=VAL)
    built = build_pairs(log.store, groups, per_task=4, max_pairs=10, on_drift="exclude")
    assert built.pairs == [] and built.excluded == {"drift": 1}
    (pair,) = build_pairs(log.store, groups, per_task=4, max_pairs=10).pairs  # trimmed, it gives the pair
    assert pair.rejected.untrained == 1 and pair.rejected.mask == (0, 0, 0, 1, 0, 0, 1, 1)


def test_build_pairs_max_pairs_keeps_the_newest_and_no_validation_task(log: Log) -> None:
    train = keys("train", 4)
    val = keys("validation", 3)
    made: dict[str, list[str]] = {}
    for k in train + val:
        made[k] = [log.run(k, True), log.run(k, False)]
    log.run(train[0], True, source="gate")  # never training data either
    log.label()
    groups = collect(log.db, val_fraction=VAL)
    built = build_pairs(log.store, groups, per_task=4, max_pairs=100)
    assert sorted(p.group for p in built.pairs) == sorted(train)
    val_ids = {t for k in val for t in made[k]}
    assert not any({p.chosen.trajectory_id, p.rejected.trajectory_id} & val_ids for p in built.pairs)
    capped = build_pairs(log.store, groups, per_task=4, max_pairs=2)
    assert ids_of(capped.pairs) == [tuple(made[train[3]]), tuple(made[train[2]])]  # the two newest tasks


def calc(expression: str) -> list[dict]:
    return [{"id": "c1", "type": "function",
             "function": {"name": "calculator", "arguments": json.dumps({"expression": expression})}}]


def test_balance_operations_keeps_an_operator_direction_only_as_often_as_its_reverse(log: Log) -> None:
    train = keys("train", 6)
    made = {}
    # three tasks teach "+ over -", one "- over +", one "* over /"; the last pits a python call against "+"
    for k, (good, bad) in zip(train, [("6 + 7", "6 - 7"), ("1 + 2", "2 - 1"), ("3 + 4", "4 - 3"),
                                      ("9 - 5", "9 + 5"), ("8 * 2", "8 / 2"), (None, "4 + 4")]):
        made[k] = (log.run(k, True, call=calc(good) if good else None,  # None: the python call
                           completion=[len(made) * 10 + 1, 2]), log.run(k, False, call=calc(bad)))
    log.label()
    groups = collect(log.db, val_fraction=VAL)
    everything = build_pairs(log.store, groups, per_task=1, max_pairs=100)
    assert len(everything.pairs) == 6 and everything.unbalanced == 0
    built = build_pairs(log.store, groups, per_task=1, max_pairs=100, balance_operations=True)
    # one "+ over -" (the newest) beside the one "- over +"; "* over /" has no reverse; python vs "+" stays
    assert sorted(ids_of(built.pairs)) == sorted([made[train[2]], made[train[3]], made[train[5]]])
    assert built.unbalanced == 3
    # cut to the newest two (python vs "+", "- over +"), "- over +" has lost its "+ over -": balanced again
    cut = build_pairs(log.store, groups, per_task=1, max_pairs=2, balance_operations=True)
    assert ids_of(cut.pairs) == [made[train[5]]] and cut.unbalanced == 4


def prepared_test_model() -> Path:
    from runtime import model as M

    if importlib.util.find_spec(M.GGUF_MODULE) is None:
        pytest.skip(f"{M.GGUF_PACKAGE} not installed: no prepared model")
    return M.prepare_model(TEST_MODEL_DIR, progress=lambda m: None)


def test_an_operator_trial_is_trained_in_the_prompt_serving_shows(store: TrajectoryStore) -> None:
    """A trial's first prompt held the narrowed calculator schema; training must not see it."""
    from runtime import rendering as R

    model_dir = prepared_test_model()
    msgs = [{"role": "user", "content": "12 apples shared by 4?"},
            gen([1, 2, 3], [7, 8], content="", tool_calls=calc("12 / 4")),
            {"role": "tool", "content": "3", "tool_call_id": "c1", "name": "calculator"},
            gen([1, 2, 3, 7, 8, 4], [5, 6], content="Each gets 3.")]
    tid = store.start(caller="a", thread_id=None, request={"input": "q"}, request_key="k", model="hone-base",
                      metadata={"task_id": "t", "expected_answer": 3, "explore_operation": "/"})
    store.finish(tid, status="ok", messages=msgs, final_answer="Each gets 3.")
    seq = trajectory_sequence(store.get(tid), model_dir=model_dir)
    plain = [{k: v for k, v in m.items() if k in ("role", "content", "tool_calls", "tool_call_id", "name")}
             for m in msgs]
    full = R.render_ids(plain, TOOL_SPECS, model_dir, add_generation_prompt=False)
    assert list(seq.ids) == full[: len(seq.ids)] and seq.ids[:3] != (1, 2, 3)  # not the logged ids
    assert '"expression": "12 / 4"' in R.load_tokenizer(model_dir).decode([i for i, m in zip(seq.ids, seq.mask) if m])
    assert "pattern" not in R.load_tokenizer(model_dir).decode(list(seq.ids))


def test_an_operator_trial_is_paired_against_the_models_own_run_first(log: Log) -> None:
    model_dir = prepared_test_model()
    solved_by_trial, solved_freely = keys("train", 2)
    own_failure = log.run(solved_by_trial, False, call=calc("12 * 4"))
    trial_win = log.run(solved_by_trial, True, call=calc("12 / 4"), explore_operation="/")
    log.run(solved_by_trial, False, call=calc("12 - 4"), explore_operation="-")  # newest failure: a trial
    own_win = log.run(solved_freely, True, call=calc("3 + 4"))
    trial_loss = log.run(solved_freely, False, call=calc("3 * 4"), explore_operation="*")
    log.label()
    built = build_pairs(log.store, collect(log.db, val_fraction=VAL), per_task=1, max_pairs=10, model_dir=model_dir)
    assert sorted(ids_of(built.pairs)) == sorted([(trial_win, own_failure), (own_win, trial_loss)])


def test_first_operation_reads_only_a_one_operation_calculator_call_made_first() -> None:
    from learner.pairs import first_operation

    def run(*messages: dict) -> dict:
        return {"messages": [{"role": "user", "content": "q"}, *messages]}
    assert first_operation(run(gen(None, None, tool_calls=calc("1,200 / 4")))) == "/"
    assert first_operation(run(gen(None, None, tool_calls=calc("(3 + 4) * 2")))) is None
    assert first_operation(run(gen(None, None, tool_calls=CALL))) is None  # python
    assert first_operation(run(gen(None, None, content="7"), gen(None, None, tool_calls=calc("3 + 4")))) is None
    assert first_operation(run({"role": "assistant", "content": "", "tool_calls": calc("1 + 1")})) is None  # an example


def test_build_pairs_on_empty_groups() -> None:
    built = build_pairs(None, Groups(), per_task=4, max_pairs=10)  # type: ignore[arg-type]
    assert built.pairs == [] and built.excluded == {}


def test_tasks_to_explore_takes_failures_and_successes_in_turn(log: Log) -> None:
    ks = sorted(keys("train", 5))
    for k in ks[:4]:
        log.run(k, False)
    log.run(ks[4], True)
    log.label()
    got = [t.key for t, _ in tasks_to_explore(collect(log.db, val_fraction=VAL))]
    failed = sorted((k for k in got if k != ks[4]), key=lambda k: hashlib.sha256(k.encode()).hexdigest())
    assert got == [failed[0], ks[4], *failed[1:]]  # the one solved task is not left behind the budget
