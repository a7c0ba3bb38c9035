#!/usr/bin/env bash
# How many cores vLLM-CPU should keep off the model: time one eval per setting of
# vllm_cpu_reserved_cores through `hone serve --no-learner`, the way users reach the agent.
#   HONE_HOME=<a home with the model prepared> bench/engine_cores.sh 1 0   # ~8 min on 2 cores
# Env: TASKS (default bench/data/asdiv-a-heldout-200.jsonl), LIMIT (60), PORT (8917).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${HONE_HOME:?set HONE_HOME to a home whose model is prepared (hone serve has run there once)}"
TASKS=${TASKS:-bench/data/asdiv-a-heldout-200.jsonl} LIMIT=${LIMIT:-60} PORT=${PORT:-8917}
unset VLLM_CPU_OMP_THREADS_BIND VLLM_CPU_NUM_OF_RESERVED_CPU  # they would override the setting
out=$(mktemp -d)
for reserved in "$@"; do
  HONE_PORT=$PORT HONE_VLLM_CPU_RESERVED_CORES=$reserved .venv/bin/hone serve --no-learner > "$out/serve-$reserved.log" 2>&1 &
  server=$!
  for _ in $(seq 1 120); do curl -sf "localhost:$PORT/healthz" > /dev/null 2>&1 && break; sleep 5; done
  start=$(date +%s.%N)
  HONE_PORT=$PORT .venv/bin/hone eval --tasks "$TASKS" --adapter base --limit "$LIMIT" --concurrency 16 --json > "$out/eval-$reserved.json"
  end=$(date +%s.%N)
  python3 -c "import json, sys; d = json.load(open(sys.argv[1])); print(f'reserved {sys.argv[2]}: {float(sys.argv[4]) - float(sys.argv[3]):.1f} s, {d[\"n_success\"]}/{d[\"n_tasks\"]} succeeded')" \
    "$out/eval-$reserved.json" "$reserved" "$start" "$end"
  kill $server; wait $server
done
grep -aho "core ids=.*" "$HONE_HOME/logs/vllm.log" | tail -n $#
