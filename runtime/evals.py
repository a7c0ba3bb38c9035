"""`hone eval`: run a task file through the served agent's HTTP API, the way users reach it, and
measure it. Every run is logged by the server like any other (`source = eval`: labelled, never
trained on); each task's outcome is written to the `evals` / `eval_results` tables as it finishes,
so an interrupted eval keeps what it measured.

Answers are scored with learner/checks.py, the code the learner's verifiers use.
Each task gets a storage namespace of its own (`<caller>/<eval id>.<n>`), shared by its turns; a
turn with `new_thread` starts a new server-side thread, so earlier facts must come from storage.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from learner.checks import check_answer
from learner.labels import FAILURE_STATUSES
from learner.tasks import Task

from . import schema

RETRIES_503 = 5  # engine restarting: wait and retry before giving up on the whole eval


class EvalAborted(RuntimeError):
    """The eval cannot go on (server unreachable, refused, engine down): nothing more is measured."""


@dataclass
class EvalOptions:
    adapter: str | None = None  # a version, "base", or None for whatever serves (needs the admin token)
    limit: int | None = None
    concurrency: int = 4
    temperature: float = 0.0  # greedy: the same server and adapter give the same number
    max_steps: int | None = None
    timeout_s: float = 900.0


@dataclass
class TaskResult:
    task_id: str
    task_type: str
    success: bool
    status: str
    answer: str = ""
    steps: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    latency_ms: float = 0.0
    adapter: str | None = None
    trajectory_ids: list[str] = field(default_factory=list)
    error: str | None = None


# ---------------------------------------------------------------- numbers
def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for k successes in n trials (sane at 0 and n, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_p(fixed: int, broken: int) -> float:
    """Exact two-sided McNemar p-value: how surprising `fixed` tasks won and `broken` tasks lost
    would be if both sides were equally good (a binomial test on the tasks whose outcome differs)."""
    n = fixed + broken
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(fixed, broken) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired(before: dict[str, bool], after: dict[str, bool]) -> dict[str, Any]:
    """Two runs of the same tasks (task id -> success), compared task by task: how many the second
    fixed and broke, and the exact McNemar p-value. With a few dozen tasks the two rates alone hide
    this: a candidate can fix 11 tasks and break 5, or fix 2 and break 0, for similar rates."""
    common = sorted(set(before) & set(after))
    fixed = [t for t in common if after[t] and not before[t]]
    broken = [t for t in common if before[t] and not after[t]]
    return {"n": len(common), "before_success": sum(before[t] for t in common),
            "after_success": sum(after[t] for t in common),
            "fixed": len(fixed), "broken": len(broken), "p_value": float(f"{mcnemar_p(len(fixed), len(broken)):.3g}"),
            "fixed_tasks": fixed, "broken_tasks": broken}


def _rate(results: Sequence[TaskResult]) -> dict[str, Any]:
    k, n = sum(r.success for r in results), len(results)
    lo, hi = wilson(k, n)
    return {"n": n, "success": k, "rate": k / n if n else None, "ci95": [round(lo, 4), round(hi, 4)]}


def _percentile(sorted_values: Sequence[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def summarize(results: Sequence[TaskResult]) -> dict[str, Any]:
    """Success rate with its 95% interval, by task type, mean steps, tool-call validity, latency.

    Tool-call validity = calls whose tool accepted them / calls attempted, where a reply that tried
    to call a tool but did not parse (status parse_error) counts as one invalid attempt."""
    parse_errors = sum(r.status == "parse_error" for r in results)
    calls, errors = sum(r.tool_calls for r in results), sum(r.tool_errors for r in results)
    attempted = calls + parse_errors
    latencies = sorted(r.latency_ms for r in results if r.error is None)
    served: dict[str, int] = {}
    for r in results:
        if r.error is None:
            served[r.adapter or "base"] = served.get(r.adapter or "base", 0) + 1
    by_type: dict[str, list[TaskResult]] = {}
    for r in results:
        by_type.setdefault(r.task_type, []).append(r)
    return {
        **_rate(results),
        "by_type": {t: _rate(rs) for t, rs in sorted(by_type.items())},
        "mean_steps": round(sum(r.steps for r in results) / len(results), 3) if results else None,
        "tool_calls": calls, "tool_errors": errors, "parse_errors": parse_errors,
        "tool_call_validity": round((calls - errors) / attempted, 4) if attempted else None,
        "latency_ms": {"mean": round(sum(latencies) / len(latencies), 1) if latencies else None,
                       "p50": _percentile(latencies, 0.5), "p95": _percentile(latencies, 0.95)},
        "request_errors": sum(r.error is not None for r in results),
        "served": served,
    }


# ---------------------------------------------------------------- storage
class EvalStore:
    def __init__(self, path: str | Path) -> None:
        self.db = schema.connect(Path(path))
        schema.migrate(self.db)

    def close(self) -> None:
        self.db.close()

    def create(self, eval_id: str, *, tasks_file: str, server: str, options: EvalOptions, n_tasks: int) -> None:
        with self.db.conn:
            self.db["evals"].insert({
                "id": eval_id, "created_at": time.time(), "state": "running", "tasks_file": tasks_file,
                "server": server, "adapter": options.adapter, "n_tasks": n_tasks, "n_done": 0, "n_success": 0,
                "options": json.dumps({k: v for k, v in asdict(options).items() if k != "adapter"}),
            })

    def add_result(self, eval_id: str, task: Task, r: TaskResult) -> None:
        with self.db.conn:
            self.db["eval_results"].insert({
                "eval_id": eval_id, "task_id": r.task_id, "task_type": r.task_type, "success": int(r.success),
                "status": r.status, "answer": r.answer, "expected": json.dumps(task.expected),
                "check_kind": task.check, "steps": r.steps, "tool_calls": r.tool_calls, "tool_errors": r.tool_errors,
                "latency_ms": round(r.latency_ms, 1), "adapter": r.adapter, "trajectory_ids": json.dumps(r.trajectory_ids),
                "error": r.error, "finished_at": time.time(),
            })
            self.db.execute("UPDATE evals SET n_done = n_done + 1, n_success = n_success + ? WHERE id = ?",
                            [int(r.success), eval_id])

    def finish(self, eval_id: str, state: str, summary: dict[str, Any], error: str | None = None) -> None:
        lo, hi = summary["ci95"]
        with self.db.conn:
            self.db["evals"].update(eval_id, {
                "state": state, "finished_at": time.time(), "success_rate": summary["rate"], "ci_low": lo,
                "ci_high": hi, "served": json.dumps(summary.pop("served")), "summary": json.dumps(summary),
                "error": error,
            })

    def list(self, limit: int = 20) -> list[dict[str, Any]]:
        rows = self.db.execute_returning_dicts("SELECT * FROM evals ORDER BY created_at DESC LIMIT ?", [limit])
        return [_decode(r) for r in rows]

    def successes(self, eval_id: str) -> dict[str, bool]:
        """Task id -> solved, for `paired`."""
        rows = self.db.execute("SELECT task_id, success FROM eval_results WHERE eval_id = ?", [eval_id]).fetchall()
        return {task_id: bool(success) for task_id, success in rows}

    def get(self, eval_id: str) -> dict[str, Any] | None:
        rows = self.db.execute_returning_dicts("SELECT * FROM evals WHERE id = ?", [eval_id])
        if not rows:
            return None
        row = _decode(rows[0])
        results = self.db.execute_returning_dicts(
            "SELECT * FROM eval_results WHERE eval_id = ? ORDER BY finished_at", [eval_id])
        for r in results:
            r["trajectory_ids"] = json.loads(r["trajectory_ids"] or "[]")
            r["expected"] = json.loads(r["expected"]) if r["expected"] else None
            r["success"] = bool(r["success"])
        row["results"] = results
        return row


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    for k in ("served", "summary", "options"):
        row[k] = json.loads(row[k]) if row.get(k) else None
    return row


def new_eval_id() -> str:
    return time.strftime("ev-%Y%m%d-%H%M%S-", time.gmtime()) + secrets.token_hex(2)


# ---------------------------------------------------------------- running
def _server_message(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return r.text[:300]


async def _post_run(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any] | str:
    """The run's JSON, or a string saying why this task's run failed; EvalAborted if nothing can run."""
    for attempt in range(RETRIES_503 + 1):
        try:
            r = await client.post("/v1/runs", json=body)
        except httpx.TimeoutException:
            return "request timed out"
        except httpx.HTTPError as e:
            raise EvalAborted(f"cannot reach the hone server at {client.base_url}: {e!r}") from None
        if r.status_code == 200:
            return r.json()
        if r.status_code == 503 and attempt < RETRIES_503:
            await asyncio.sleep(min(30.0, 2.0 * 2**attempt))
            continue
        if r.status_code in (422, 504) and r.headers.get("content-type", "").startswith("application/json"):
            kind = (r.json().get("error") or {}).get("type")
            if kind in ("engine_rejected", "timeout"):  # this task's run failed; the next may not
                return f"{kind}: {_server_message(r)}"
        raise EvalAborted(f"the server refused the run ({r.status_code}): {_server_message(r)}")
    raise AssertionError("unreachable")


def turn_plan(task: Task, namespace: str) -> list[tuple[dict[str, Any], str | None]]:
    """Each turn's request content and thread id. A turn runs in a thread only if it continues the
    previous turn or the next turn continues it. A new conversation that nothing continues runs
    thread-less: the same prompt (a fresh thread has no history), and a run the learner can re-run."""
    if not task.turns:
        return [({"messages": list(task.messages)}, None)]
    starts = [i == 0 or t.new_thread for i, t in enumerate(task.turns)]
    plan: list[tuple[dict[str, Any], str | None]] = []
    thread_start = 0
    for i, t in enumerate(task.turns):
        thread_start = i if starts[i] else thread_start
        continued = i + 1 < len(task.turns) and not starts[i + 1]
        plan.append(({"input": t.content}, f"{namespace}.{thread_start}" if not starts[i] or continued else None))
    return plan


def turn_metadata(task: Task, i: int, **extra: Any) -> dict[str, Any]:
    """Only the last turn is checked: earlier ones get their own task id and no expected answer."""
    if i < max(len(task.turns), 1) - 1:
        return {**extra, "task_id": f"{task.key}#turn{i}"}
    return {**extra, "task_id": task.key, "expected_answer": task.expected, "check": task.check}


async def run_task(client: httpx.AsyncClient, task: Task, eval_id: str, index: int, options: EvalOptions) -> TaskResult:
    """All of a task's turns, in one storage namespace; scored on the last turn's reply."""
    namespace = f"{eval_id}.{index}"
    result = TaskResult(task.id, task.group or "default", False, "error")
    turns = turn_plan(task, namespace)
    for i, (content, thread_id) in enumerate(turns):
        last = i == len(turns) - 1
        metadata = turn_metadata(task, i, eval_id=eval_id)
        body: dict[str, Any] = {**content, "metadata": metadata, "source": "eval", "namespace": namespace,
                                "temperature": options.temperature}
        if thread_id:
            body["thread_id"] = thread_id
        if options.adapter:
            body["adapter"] = options.adapter
        if options.max_steps:
            body["max_steps"] = options.max_steps
        out = await _post_run(client, body)
        if isinstance(out, str):
            result.error, result.status = out, out.split(":")[0]
            return result
        result.trajectory_ids.append(out["trajectory_id"])
        result.steps += int(out.get("steps") or 0)
        result.tool_calls += int(out.get("tool_calls") or 0)
        result.tool_errors += int(out.get("tool_errors") or 0)
        result.latency_ms += float(out.get("latency_ms") or 0.0)
        result.adapter, result.status, result.answer = out.get("adapter"), out["status"], out.get("answer") or ""
        if out["status"] in FAILURE_STATUSES and not last:
            return result  # an earlier turn failed (e.g. the save never happened): the task failed
    result.success = result.status not in FAILURE_STATUSES and check_answer(result.answer, task.expected, task.check)
    return result


async def run_eval(store: EvalStore, tasks: Sequence[Task], *, server: str, headers: dict[str, str],
                   tasks_file: str, options: EvalOptions, eval_id: str | None = None,
                   on_result: Callable[[TaskResult], None] | None = None,
                   transport: httpx.AsyncBaseTransport | None = None) -> dict[str, Any]:
    """Run `tasks` (the first `options.limit`) with `options.concurrency` at a time; returns the
    stored eval row. EvalAborted propagates after the eval is marked failed, results kept."""
    tasks = list(tasks)[: options.limit] if options.limit else list(tasks)
    eval_id = eval_id or new_eval_id()
    store.create(eval_id, tasks_file=tasks_file, server=server, options=options, n_tasks=len(tasks))
    results: list[TaskResult] = []
    sem = asyncio.Semaphore(max(1, options.concurrency))
    limits = httpx.Limits(max_connections=options.concurrency + 2)
    async with httpx.AsyncClient(base_url=server, headers=headers, timeout=options.timeout_s, limits=limits,
                                 transport=transport) as client:

        async def one(index: int, task: Task) -> None:
            async with sem:
                r = await run_task(client, task, eval_id, index, options)
            store.add_result(eval_id, task, r)
            results.append(r)
            if on_result is not None:
                on_result(r)

        jobs = [asyncio.ensure_future(one(i, t)) for i, t in enumerate(tasks)]
        try:
            await asyncio.gather(*jobs)
        except EvalAborted as e:
            for j in jobs:
                j.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)
            store.finish(eval_id, "failed", summarize(results), error=str(e))
            raise
        except (asyncio.CancelledError, KeyboardInterrupt):
            for j in jobs:
                j.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)
            store.finish(eval_id, "interrupted", summarize(results), error="interrupted")
            raise
    store.finish(eval_id, "done", summarize(results))
    row = store.get(eval_id)
    assert row is not None
    return row
