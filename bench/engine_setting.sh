#!/usr/bin/env bash
# Time one eval per value of an engine setting, through `hone serve --no-learner` and `hone eval`,
# the way users reach the agent. Each value gets a fresh server (cold prefix cache, like a restart).
#   HONE_HOME=<a home with the model prepared> bench/engine_setting.sh vllm_cpu_reserved_cores 1 0
#   HONE_HOME=<...> bench/engine_setting.sh vllm_block_size 32 128 32 128     # ~10 min on 2 cores
# Env: TASKS (default bench/data/asdiv-a-heldout-200.jsonl), LIMIT (60), CONCURRENCY (16), PORT (8917).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${HONE_HOME:?set HONE_HOME to a home whose model is prepared (hone serve has run there once)}"
[ $# -ge 2 ] || { echo "usage: $0 SETTING VALUE [VALUE ...]" >&2; exit 2; }
setting=$1; shift
var=HONE_$(echo "$setting" | tr '[:lower:]' '[:upper:]')
TASKS=${TASKS:-bench/data/asdiv-a-heldout-200.jsonl} LIMIT=${LIMIT:-60} CONCURRENCY=${CONCURRENCY:-16} PORT=${PORT:-8917}
unset VLLM_CPU_OMP_THREADS_BIND VLLM_CPU_NUM_OF_RESERVED_CPU  # they would override vllm_cpu_reserved_cores
out=$(mktemp -d)
i=0
for value in "$@"; do
  i=$((i + 1))
  env HONE_PORT="$PORT" "$var=$value" .venv/bin/hone serve --no-learner > "$out/serve-$i.log" 2>&1 &
  server=$!
  for _ in $(seq 1 120); do curl -sf "localhost:$PORT/healthz" > /dev/null 2>&1 && break; sleep 5; done
  start=$(date +%s.%N)
  HONE_PORT=$PORT .venv/bin/hone eval --tasks "$TASKS" --adapter base --limit "$LIMIT" --concurrency "$CONCURRENCY" --json > "$out/eval-$i.json"
  end=$(date +%s.%N)
  hit=$(grep -ao "Prefix cache hit rate: [0-9.]*%" "$HONE_HOME/logs/vllm.log" | tail -n 1)
  python3 -c "import json, sys; d = json.load(open(sys.argv[1])); print(f'{sys.argv[2]}: {float(sys.argv[4]) - float(sys.argv[3]):.1f} s, {d[\"n_success\"]}/{d[\"n_tasks\"]} succeeded, {sys.argv[5]}')" \
    "$out/eval-$i.json" "$setting=$value" "$start" "$end" "$hit"
  grep -aho "core ids=.*" "$HONE_HOME/logs/vllm.log" | tail -n 1
  kill $server; wait $server
done
