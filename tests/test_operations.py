"""bench/operations.py: which operation a word problem needs, and what a failed attempt did instead,
read from a real eval in a real SQLite log and from bench/ceiling.py's report."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from learner.tasks import Task
from runtime.evals import EvalOptions, EvalStore, TaskResult
from runtime.store import TrajectoryStore

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("operations", ROOT / "bench" / "operations.py")
operations = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(operations)


def test_the_needed_operation_is_one_operation_on_two_numbers_of_the_question() -> None:
    q = "28 beads are shared equally among 7 necklaces. How many beads are on each necklace?"
    assert operations.needed(q, 4) == ("/", 28.0, 7.0)
    assert operations.needed("Sara had 50 dollars and spent 18. How much is left?", "32") == ("-", 50.0, 18.0)
    assert operations.needed("A farm has 1,200 cows and 300 pigs.", 1500) == ("+", 1200.0, 300.0)
    assert operations.needed("Tom has 3 bags of 4 apples and eats 2.", 10) is None  # two steps
    assert operations.needed("Tom has 3 bags.", "many") is None


def test_a_failure_is_named_by_how_its_expression_differs_from_the_needed_one() -> None:
    need = ("/", 28.0, 7.0)
    assert operations.what_it_did(need, "28 * 7") == "used *"
    assert operations.what_it_did(need, "7 / 28") == "swapped"
    assert operations.what_it_did(need, "28 / 4") == "numbers"
    assert operations.what_it_did(need, "(28 / 7) + 1") == "longer"
    assert operations.what_it_did(need, None) == "no call"


def _run(store: TrajectoryStore, question: str, expression: str | None, answer: str) -> str:
    tid = store.start(caller="eval", thread_id=None, request={"input": question}, metadata={},
                      request_key=f"rk-{question}", source="eval", model="hone-base")
    examples = [{"role": "user", "content": "What is 12 + 5?"},  # the prompt's worked example, not generated
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "example_0", "type": "function",
                     "function": {"name": "calculator", "arguments": '{"expression": "12 + 5"}'}}]}]
    msgs = [*examples, {"role": "user", "content": question}]
    if expression is not None:
        msgs.append({"role": "assistant", "content": "", "generated": True, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "calculator", "arguments": json.dumps({"expression": expression})}}]})
        msgs.append({"role": "tool", "content": "?", "tool_call_id": "c1", "name": "calculator"})
    msgs.append({"role": "assistant", "content": f"The answer is {answer}.", "generated": True})
    store.finish(tid, status="ok", messages=msgs, final_answer=f"The answer is {answer}.")
    return tid


def test_an_eval_in_a_real_log_is_tallied_by_needed_operation(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cases = [  # question, expected, first expression, the reply's number, solved
        ("28 beads are shared among 7 necklaces. How many on each?", 4, "28 * 7", "196", False),
        ("36 cookies are split among 9 kids. How many each?", 4, "36 / 9", "4", True),
        ("Sara had 50 dollars and spent 18. How much is left?", 32, "18 - 50", "-32", False),
        ("Tom has 3 bags of 4 apples and eats 2. How many are left?", 10, "3 * 4", "12", False),
        ("Ann has 6 pens and buys 5 more. How many pens?", 11, None, "11", True),
    ]
    with TrajectoryStore(tmp_path / "hone.db") as store:
        ids = [_run(store, q, e, a) for q, _, e, a, _ in cases]
    evals = EvalStore(tmp_path / "hone.db")
    evals.create("ev-1", tasks_file="/x/heldout.jsonl", server="http://h", options=EvalOptions(adapter="hone-v1"),
                 n_tasks=len(cases))
    for i, ((q, expected, _, _, ok), tid) in enumerate(zip(cases, ids)):
        task = Task(key=f"file:t{i}", messages=({"role": "user", "content": q},), expected=expected, check="numeric")
        evals.add_result("ev-1", task, TaskResult(f"t{i}", "asdiv", ok, "ok", trajectory_ids=[tid]))
    lost = Task(key="file:t9", messages=({"role": "user", "content": "Ann has 6 pens and buys 5."},), expected=11)
    evals.add_result("ev-1", lost, TaskResult("t9", "asdiv", False, "engine_error"))  # never reached the model
    evals.close()

    assert operations.main(["--home", str(tmp_path), "--eval", "ev-1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == {"hone-v1 (ev-1, heldout.jsonl) [1 results without a readable run left out]": {
        "+": {"n": 1, "solved": 1, "failures": {}},
        "-": {"n": 1, "solved": 0, "failures": {"swapped": 1}},
        "/": {"n": 2, "solved": 1, "failures": {"used *": 1}},
        "other": {"n": 1, "solved": 0, "failures": {}},
    }}
    assert operations.main(["--home", str(tmp_path), "--eval", "ev-9"]) == 2
    assert "no eval 'ev-9'" in capsys.readouterr().err


def test_a_ceiling_report_counts_greedy_successes_per_operation(capsys: pytest.CaptureFixture) -> None:
    tasks = ROOT / "bench" / "data" / "asdiv-a-heldout-200.jsonl"
    ceiling = ROOT / "bench" / "results" / "ceiling-asdiv-base.json"
    assert operations.main(["--tasks", str(tasks), "--ceiling", str(ceiling), "--json"]) == 0
    (report,) = json.loads(capsys.readouterr().out).values()
    assert sum(v["n"] for v in report.values()) == 200
    greedy = json.loads(ceiling.read_text())["pools"]["heldout"]["greedy"]
    assert sum(v["solved"] for v in report.values()) == round(greedy * 200)
    assert all(v["failures"] == {} for v in report.values())  # no trajectories: not classified


def test_missing_inputs_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert operations.main([]) == 2
    assert "nothing to read" in capsys.readouterr().err
    assert operations.main(["--home", str(tmp_path), "--eval", "ev-1"]) == 2
    assert "no trajectory log" in capsys.readouterr().err
    assert operations.main(["--ceiling", str(tmp_path / "c.json")]) == 2
    assert "needs --tasks" in capsys.readouterr().err
    (tmp_path / "c.json").write_text('{"pools": {}}')
    tasks = ROOT / "bench" / "data" / "asdiv-a-heldout-200.jsonl"
    assert operations.main(["--tasks", str(tasks), "--ceiling", str(tmp_path / "c.json")]) == 2
    assert "not a bench/ceiling.py report" in capsys.readouterr().err
