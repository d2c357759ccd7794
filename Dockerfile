# syntax=docker/dockerfile:1
# Tallyflow: the `tallyflow` command (rating and delivery dataflows, sandbox, topics,
# recovery init, ...) in a non-root image with a read-only-friendly layout.
#
#   docker build -t ghcr.io/tallyflow/tallyflow:0.1.0 .
#   docker run --rm ghcr.io/tallyflow/tallyflow:0.1.0 config

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: a virtualenv with the project and its runtime dependencies ---------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src

# Dependencies first, in their own layer: rebuilt only when pyproject.toml or README.md change.
# Empty stand-ins for the packages let `pip install .` resolve and install them; the real
# sources replace the stand-ins below. Runtime dependencies only: no `dev` or `local`
# extras (the local Tansu broker is not part of the image).
COPY pyproject.toml README.md ./
ARG PACKAGES="schemas operators runtime state sinks connectors dataflows serving ops devkit tallyflow"
RUN for pkg in $PACKAGES; do mkdir -p "$pkg" && touch "$pkg/__init__.py"; done \
    && pip install --no-cache-dir . \
    && pip uninstall --yes tallyflow \
    && rm -rf $PACKAGES build ./*.egg-info

# The packages, bottom to top (see ARCHITECTURE.md).
COPY schemas/ schemas/
COPY operators/ operators/
COPY runtime/ runtime/
COPY state/ state/
COPY sinks/ sinks/
COPY connectors/ connectors/
COPY dataflows/ dataflows/
COPY serving/ serving/
COPY ops/ ops/
COPY devkit/ devkit/
COPY tallyflow/ tallyflow/
# Non-editable; pip compiles the bytecode at install time (the runtime root file system is
# read-only, so nothing could be compiled later).
RUN pip install --no-cache-dir --no-deps . \
    && tallyflow --help >/dev/null

# --- runtime -----------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="tallyflow" \
      org.opencontainers.image.description="SaaS usage telemetry from Kafka to threshold alerts, rated usage and dead letters, on Bytewax" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/tallyflow/tallyflow" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim-bookworm"

# uid/gid 10001, matching the pods' securityContext; the directories the pods mount volumes
# on exist and belong to it, so the image also runs outside Kubernetes.
RUN groupadd --system --gid 10001 tallyflow \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin tallyflow \
    && mkdir -p /etc/tallyflow/catalog /etc/tallyflow/secrets /var/lib/tallyflow/recovery /run/tallyflow \
    && chown -R 10001:10001 /var/lib/tallyflow /run/tallyflow

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TALLYFLOW_CATALOG=/etc/tallyflow/catalog/catalog.yaml \
    TALLYFLOW_LOG_FORMAT=json

WORKDIR /var/lib/tallyflow
USER 10001:10001

# 9100: /metrics, /healthz, /readyz; 2101: Bytewax inter-process traffic.
EXPOSE 9100 2101

ENTRYPOINT ["tallyflow"]
CMD ["rate"]
