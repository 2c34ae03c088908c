# labelq: the confident-learning HTTP service (`labelq serve`).
#
# Build:  docker build -t labelq:0.1.0 .        (or: buildah bud --format docker -t labelq:0.1.0 .)
# Run:    docker run --rm -p 8000:8000 --read-only --tmpfs /tmp \
#           --mount type=tmpfs,destination=/var/cache/labelq,tmpfs-mode=1777 labelq:0.1.0
#
# Both stages use the same base image (one ARG), so the venv built in the first stage runs on the
# very same interpreter in the second. The tag is exact (Python patch and Debian release); bump it
# deliberately. A digest is left out on purpose: add `@sha256:...` where your registry is reachable.
# scripts/image.sh builds this file offline against a locally bootstrapped stand-in of that tag.
ARG PYTHON_IMAGE=python:3.11.15-slim-bookworm

# --- builder: the project and its dependencies in /opt/venv --------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# Optional CA bundle for pip behind a TLS-intercepting proxy (scripts/image.sh mounts the host's).
ARG PIP_CERT=""

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# Dependencies first, keyed on pyproject.toml only: a source or README change reuses this layer.
# (An empty `service` package and README let pip resolve and install the project's dependencies.)
COPY pyproject.toml ./
RUN mkdir service && touch service/__init__.py README.md \
    && pip install . \
    && pip uninstall -y labelq \
    && rm -rf service build ./*.egg-info README.md

# Then the project itself, without touching the dependencies again. Bytecode is compiled here
# because the runtime root filesystem is read-only. pip and setuptools leave the venv last: the
# runtime installs nothing.
COPY README.md ./
COPY service ./service
RUN pip install --no-deps . \
    && python3 -m compileall -q /opt/venv \
    && labelq --help >/dev/null \
    && pip uninstall -y pip setuptools

# --- runtime: interpreter + venv, no compilers, no pip cache, non-root ------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="labelq" \
      org.opencontainers.image.description="Stateless HTTP service that finds label errors in classification datasets (confident learning)." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://labelq.invalid/labelq" \
      org.opencontainers.image.licenses="NOASSERTION" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

# Fixed UID/GID 10001: the Helm chart's runAsUser/runAsGroup/fsGroup match it.
# The numba cache directory exists (and is writable) even without a volume; with a read-only root
# filesystem mount a writable volume there (the chart uses an emptyDir).
RUN groupadd --system --gid 10001 labelq \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
       --shell /usr/sbin/nologin labelq \
    && mkdir -p /var/cache/labelq \
    && chown 10001:10001 /var/cache/labelq \
    && chmod 0775 /var/cache/labelq

COPY --from=builder /opt/venv /opt/venv

# HOME and TMPDIR point at /tmp, the only other writable place (tmpfs/emptyDir) under a
# read-only root. LABELQ_HOST=0.0.0.0: inside a container the service must accept outside traffic.
# NUMBA_NUM_THREADS is deliberately unset here: the orchestrator sets it from the CPU limit.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    NUMBA_CACHE_DIR=/var/cache/labelq \
    LABELQ_HOST=0.0.0.0 \
    LABELQ_PORT=8000

WORKDIR /tmp
USER 10001:10001
EXPOSE 8000

# Only for docker/compose (Kubernetes uses the chart's probes; OCI-format images drop it).
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('LABELQ_PORT', '8000') + '/health/ready', timeout=2)"]

# uvicorn shuts down gracefully on SIGTERM (in-flight requests get up to 30 s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["labelq"]
CMD ["serve"]
