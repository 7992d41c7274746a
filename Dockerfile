# One image for the `maas` services (authz, meter, controlplane, sim) and the `keys` CLI. `maas demo` is not meant
# to run from it: it reads deploy/'s sample manifests and starts Envoy and redis-server, none of which the image
# holds; run it from a source checkout (`make demo`).
#
# Build:  make image            (docker or podman; see deploy/image.mk)
# Run:    docker run --rm IMAGE maas --version
#
# The final stage holds the Python runtime and a virtualenv with the project and its wheels: no compiler, no pip
# cache, no source tree. It runs as a fixed non-root numeric user and never writes below / (bytecode is compiled
# at build time, HOME and TMPDIR point at /tmp), so it works with readOnlyRootFilesystem and an emptyDir on /tmp.
# There is no HEALTHCHECK: Kubernetes probes the ops port (/healthz, /readyz) of each process.

ARG PYTHON_IMAGE=python:3.12.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# A compiler only for platforms where a dependency ships no wheel; it stays in this stage.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/maas
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY gateway ./gateway
COPY controlplane ./controlplane
RUN /opt/maas/bin/pip install --no-compile -c constraints.txt . \
 && /opt/maas/bin/pip uninstall -y pip setuptools wheel \
 && /opt/maas/bin/python -m compileall -q -j 0 /opt/maas/lib \
 && /opt/maas/bin/maas --version

FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION=0.0.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="maas-gateway" \
      org.opencontainers.image.description="Models-as-a-Service gateway for KServe + Istio: ext_authz API keys and limits, metering sidecar, control plane" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
ENV PATH=/opt/maas/bin:/usr/local/bin:/usr/bin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp
COPY --from=build /opt/maas /opt/maas
WORKDIR /tmp
# authz, meter, controlplane main ports, then their ops ports (/healthz, /readyz, /metrics).
EXPOSE 8500 8600 8700 9500 9600 9700
USER 65532:65532
CMD ["maas", "--help"]
