# syntax=docker/dockerfile:1
# The lmforge image: the official Ray image of the pinned Ray version, plus PyTorch, lmforge and
# the jobs/ entry points. The Helm chart's RayJobs run `python jobs/<job>.py` from WORKDIR.
#
#   docker build -t REGISTRY/lmforge:0.1.0-cpu .                                  # CPU
#   docker build -t REGISTRY/lmforge:0.1.0-gpu --build-arg FLAVOR=gpu .           # CUDA
#
# Runs as the image's non-root user `ray` (uid 1000, gid 100), the user the chart's pod
# securityContext names. Nothing secret is baked in: the Ray token and storage credentials
# come from Kubernetes Secrets at run time.

# One Ray pin: pyproject.toml, the chart's ray.version and this default agree (tests/k8s checks).
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
# cpu or gpu: the rayproject/ray variant (gpu carries CUDA) and the PyTorch build.
ARG FLAVOR=cpu
# The base image's digest (sha256:...), so a moved tag cannot change what is built on:
# docker buildx imagetools inspect rayproject/ray:2.60.0-py311-cpu. Empty: by tag.
ARG BASE_DIGEST=
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${FLAVOR}${BASE_DIGEST:+@${BASE_DIGEST}}

ARG FLAVOR
ARG RAY_VERSION
ARG TORCH_VERSION=2.13.0
# Empty: the CPU wheel index for FLAVOR=cpu, PyPI's default (CUDA) build for FLAVOR=gpu.
ARG TORCH_INDEX_URL=

LABEL org.opencontainers.image.title="lmforge" \
      org.opencontainers.image.description="Build a language model end to end on Ray" \
      org.opencontainers.image.licenses="Apache-2.0"

USER ray
WORKDIR /home/ray/lmforge
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0

# The lock file (constraints.txt): lmforge and its dependencies get the versions CI and
# `make setup` install; torch is chosen by TORCH_VERSION and FLAVOR.
COPY --chown=ray:users constraints.txt ./

# PyTorch first, in its own layer: it is the biggest and changes least often.
RUN set -eux; \
    index="${TORCH_INDEX_URL}"; \
    if [ -z "$index" ] && [ "$FLAVOR" = "cpu" ]; then index="https://download.pytorch.org/whl/cpu"; fi; \
    pip install ${index:+--index-url "$index"} "torch==${TORCH_VERSION}"

# lmforge itself (a regular install: the source tree is not kept in the image).
COPY --chown=ray:users pyproject.toml README.m[d] ./
COPY --chown=ray:users platform ./platform
RUN set -eux; \
    pip install -c constraints.txt . ; \
    rm -rf platform build ./*.egg-info; \
    python -c "import lmforge, ray, torch; assert ray.__version__ == '${RAY_VERSION}', ray.__version__; print('lmforge', lmforge.__version__, 'ray', ray.__version__, 'torch', torch.__version__)"

# The RayJob entry points and their configs; job-configs/ is where the chart mounts the
# stages' config ConfigMaps (entrypoints read job-configs/<stage>.yaml).
COPY --chown=ray:users jobs ./jobs
RUN mkdir -p job-configs
