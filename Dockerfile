# One image for the api, the worker and the one-shot migration (docker-compose.yml picks the command).
# torch: the CPU build pinned in pyproject.toml by default; GPU boxes build with their CUDA build:
#   docker build --build-arg TORCH_INDEX_URL=<the PyTorch wheel index for your CUDA> .
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TRAINBOX_DATA_DIR=/data

RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential procps \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# torch first (its own index on GPU boxes), then the rest from the pinned pyproject.toml.
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX_URL"; \
    else \
        pip install "torch==${TORCH_VERSION}"; \
    fi
COPY pyproject.toml README.md ./
COPY api ./api
COPY core ./core
COPY worker ./worker
COPY trainer ./trainer
COPY client ./client
COPY migrations ./migrations
RUN pip install . && python -c "import api.app, worker.tasks, trainer, client.cli"

RUN useradd --create-home --uid 1000 trainbox && mkdir -p /data && chown trainbox /data
USER trainbox
VOLUME ["/data"]
EXPOSE 8000
CMD ["trainbox", "--help"]
