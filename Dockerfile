# One image for all three streamgroup services; the command picks the service:
#   streamgroup-producer | streamgroup-consumer (default) | streamgroup-reclaimer | streamgroup
#
# Build:  podman build -t streamgroup:dev .        (or: docker build -t streamgroup:dev .)
# Behind a TLS-re-signing proxy, hand pip the proxy's CA bundle (docs/image.md):
#   podman build -v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro \
#                --build-arg PIP_CERT=/run/host-ca.crt -t streamgroup:dev .
#
# The base must be a Debian-based image with python3 (and its venv module) on PATH; both the
# official python:3.12-slim (/usr/local/bin/python3) and plain Debian with python3-venv
# (/usr/bin/python3, used as a stand-in base in CI, see tests/image/) work, because every step
# calls `python3` and works inside a venv.
ARG PYTHON_BASE=python:3.12-slim

# ---------------------------------------------------------------------------------------------
# builder: the wheels of the project and of all its runtime dependencies, installed from those
# wheels alone into the venv /opt/streamgroup that the runtime stage copies.
FROM ${PYTHON_BASE} AS builder

# Optional: path (inside the build) of a CA bundle for pip; unset, pip uses its own bundle.
ARG PIP_CERT
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN python3 -m venv /opt/build-venv

WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
# --prefer-binary: use the dependencies' published wheels (hiredis included) rather than
# compiling them; the project's own wheel is built from source with setuptools.
RUN /opt/build-venv/bin/pip wheel --prefer-binary --wheel-dir /wheels . \
    && ls -l /wheels

# Install the wheels (--no-index: nothing else) into a clean venv, byte-compiled at install time
# so a read-only root filesystem costs nothing; then drop pip and setuptools from it. The venv
# refers to the base's python3 by path, which the runtime stage (same base) has too.
RUN python3 -m venv /opt/streamgroup \
    && /opt/streamgroup/bin/pip install --no-index --find-links /wheels streamgroup \
    && /opt/streamgroup/bin/pip uninstall -y pip setuptools

# ---------------------------------------------------------------------------------------------
# runtime: same base, tini, the venv; no compilers, no pip, no sources, no wheel files.
# (The venv is copied rather than installed here from a `RUN --mount=from=builder` of the wheels:
# podman/buildah 4.x mount a stale or empty builder stage when it comes from the layer cache.)
FROM ${PYTHON_BASE} AS runtime

LABEL org.opencontainers.image.title="streamgroup" \
      org.opencontainers.image.description="Redis Streams consumer-group services: producer, consumer, reclaimer" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/streamgroup \
    PATH=/opt/streamgroup/bin:$PATH

# tini as PID 1: forwards SIGTERM/SIGINT to the service and reaps zombies.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends tini \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb

# Numeric non-root user (Kubernetes runAsNonRoot can verify a numeric UID); no home, no shell.
RUN groupadd --gid 10001 streamgroup \
    && useradd --uid 10001 --gid 10001 --no-create-home --no-log-init \
       --home-dir /nonexistent --shell /usr/sbin/nologin streamgroup

COPY --from=builder /opt/streamgroup /opt/streamgroup
RUN python3 -c "import streamgroup, streamgroup_producer, streamgroup_consumer, streamgroup_reclaimer" \
    && for script in streamgroup streamgroup-producer streamgroup-consumer streamgroup-reclaimer; do \
           command -v "$script" || exit 1; \
       done

USER 10001:10001

# Prometheus metrics and /healthz, /readyz (STREAMGROUP_METRICS_PORT, default 9180).
EXPOSE 9180

ENTRYPOINT ["tini", "--"]
CMD ["streamgroup-consumer"]
