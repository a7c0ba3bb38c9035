# GPU serving image: hone on the CUDA build of vLLM (`vllm` from PyPI, which brings its own CUDA
# runtime libraries; the host needs an NVIDIA driver and the NVIDIA container toolkit).
# Same install logic as everywhere else: scripts/install.sh. Build a CPU image with
#   docker build --build-arg HONE_DEVICE=cpu .
# Run (tokens are required to listen beyond loopback inside the container):
#   docker run --gpus all -p 8080:8080 -v hone-data:/data \
#     -e HONE_API_TOKENS=me:<token> -e HONE_ADMIN_TOKEN=<admin-token> hone
FROM python:3.11-slim

ARG HONE_DEVICE=gpu
# gcc: triton and torch.compile build small kernels at run time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc g++ libc6-dev procps \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/hone
COPY pyproject.toml README.md Makefile ./
COPY constraints ./constraints
COPY scripts ./scripts
COPY runtime ./runtime
COPY tools ./tools
COPY learner ./learner
RUN HONE_DEVICE=${HONE_DEVICE} VENV=/opt/venv bash scripts/install.sh

ENV PATH=/opt/venv/bin:$PATH \
    HONE_HOME=/data \
    HONE_MODEL=/opt/hone-model/smollm2-135m-instruct \
    HONE_HOST=0.0.0.0 \
    HONE_PORT=8080
# Bake the converted default model into the image, outside the data volume.
RUN HONE_HOME=/opt/hone-model-build HONE_MODEL= hone model prepare \
 && mkdir -p /opt/hone-model \
 && mv /opt/hone-model-build/models/smollm2-135m-instruct /opt/hone-model/ \
 && rm -rf /opt/hone-model-build

VOLUME /data
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8080/healthz')" || exit 1
CMD ["hone", "serve"]
