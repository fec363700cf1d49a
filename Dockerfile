# dlrun for GPU nodes and clusters. Build: docker build -t dlrun .
# Run as yourself, so that results belong to you (any uid works; the image's own user is uid 1001):
#   mkdir -p outputs data && docker run --rm --gpus all --user "$(id -u):$(id -g)" \
#       -v "$PWD/outputs:/outputs" -v "$PWD/data:/data" dlrun model=resnet hardware=gpu
# The W&B key comes from the environment at run time (docker run -e WANDB_API_KEY ...), never from the image.
#
# Base: PyPI's torch wheel brings its own CUDA libraries (cuBLAS, cuDNN, NCCL, ... as nvidia-* wheels)
# and the host's driver comes in through the NVIDIA container toolkit, so only CUDA's small `base`
# image is needed, not `runtime`/`cudnn` (they would add a second copy of those libraries, ~3 GB).
# What `base` adds: NVIDIA_VISIBLE_DEVICES/NVIDIA_DRIVER_CAPABILITIES and NVIDIA_REQUIRE_CUDA (the
# toolkit exposes the GPUs and refuses too old a driver with a clear message) and CUDA's
# forward-compatibility libraries. Its CUDA version (13.0) matches the torch wheel's (2.14.1+cu130).
# Any base with apt-get works, e.g. --build-arg BASE_IMAGE=debian:bookworm-slim (the tests build on a
# locally bootstrapped Debian; GPUs then need the toolkit's variables set by --gpus).
ARG BASE_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/dlrun \
    PATH=/opt/dlrun/bin:$PATH

# Unpinned on purpose: the distribution's current python3 and its security fixes. The home directory is
# writable by any uid (sticky, like /tmp): caches (W&B, matplotlib, torch) go there under --user.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV" \
    && groupadd --gid 1001 dlrun \
    && useradd --create-home --uid 1001 --gid 1001 --shell /bin/bash dlrun \
    && chmod 1777 /home/dlrun \
    && mkdir -p /outputs /data \
    && chown dlrun:dlrun /outputs /data

# Dependencies first, at the versions of constraints.txt: this layer (several GB, torch) stays cached
# while dlrun's own code changes.
WORKDIR /src
COPY pyproject.toml constraints.txt ./
RUN python3 -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > requirements.txt \
    && pip install --no-cache-dir -r requirements.txt -c constraints.txt

# The package itself; the configs ship inside it.
COPY README.md ./
COPY dlrun ./dlrun
COPY conf ./conf
COPY hydra_plugins ./hydra_plugins
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf /src

# Results and data sets live outside the container.
ENV DLRUN_OUTPUT_DIR=/outputs \
    DLRUN_DATA_DIR=/data \
    HOME=/home/dlrun
VOLUME ["/outputs", "/data"]

USER 1001:1001
WORKDIR /home/dlrun
ENTRYPOINT ["dlrun"]
