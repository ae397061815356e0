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
#
# Pinned by digest (the tag only documents it): the same bytes on every build. To refresh, e.g.
# for a security update of the base: `skopeo inspect --format '{{.Digest}}'
# docker://docker.io/library/python:3.12-slim` (or `crane digest ...`), put the digest here,
# rebuild, run the image tests (docs/image.md).
ARG PYTHON_BASE=docker.io/library/python:3.12-slim@sha256:78387bc3881b8273120a12ebe6c1ab22b018ccc2c9adf565ae1ac9b536e184ea

# ---------------------------------------------------------------------------------------------
# builder: the runtime dependencies from the hashed lock file requirements/image.txt (pip refuses
# any file whose hash is not in it) and the project's own wheel, into the venv /opt/streamgroup
# that the runtime stage copies. The lock files are made by `make image-lock` (uv, from
# pyproject.toml).
FROM ${PYTHON_BASE} AS builder

# Optional: path (inside the build) of a CA bundle for pip; unset, pip uses its own bundle.
ARG PIP_CERT
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN python3 -m venv /opt/build-venv

WORKDIR /src
COPY requirements/build.txt requirements/image.txt ./requirements/
# The build backend (setuptools, wheel), hashed too; the project's wheel is built with it and
# without build isolation, so nothing unhashed is fetched.
RUN /opt/build-venv/bin/pip install --require-hashes --no-deps --only-binary=:all: -r requirements/build.txt

# The locked dependencies: published wheels only (hiredis and pydantic-core included), each
# checked against its hash; byte-compiled at install time so a read-only root filesystem costs
# nothing. The venv refers to the base's python3 by path, which the runtime stage (same base) has.
RUN python3 -m venv /opt/streamgroup \
    && /opt/streamgroup/bin/pip install --require-hashes --no-deps --only-binary=:all: -r requirements/image.txt

COPY pyproject.toml README.md ./
COPY services ./services
RUN /opt/build-venv/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /wheels . \
    && /opt/streamgroup/bin/pip install --no-deps --no-index /wheels/streamgroup-*.whl \
    && /opt/streamgroup/bin/pip check \
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
