# dlrun for GPU nodes and clusters. Build: docker build -t dlrun .
# Run:  docker run --gpus all -v "$PWD/outputs:/outputs" -v "$PWD/data:/data" dlrun model=resnet hardware=gpu
# The W&B key comes from the environment at run time (docker run -e WANDB_API_KEY ...), never from the image.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/dlrun \
    PATH=/opt/dlrun/bin:$PATH

# Unpinned on purpose: the distribution's current python3 and its security fixes.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV" \
    && groupadd --gid 1001 dlrun \
    && useradd --create-home --uid 1001 --gid 1001 --shell /bin/bash dlrun \
    && mkdir -p /outputs /data \
    && chown dlrun:dlrun /outputs /data

# The package (torch, Lightning, Hydra, ... from its pyproject.toml); the configs ship inside it.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY dlrun ./dlrun
COPY conf ./conf
COPY hydra_plugins ./hydra_plugins
RUN pip install --no-cache-dir . \
    && rm -rf /src

# Results and data sets live outside the container.
ENV DLRUN_OUTPUT_DIR=/outputs \
    DLRUN_DATA_DIR=/data
VOLUME ["/outputs", "/data"]

USER 1001:1001
WORKDIR /home/dlrun
ENTRYPOINT ["dlrun"]
