# syntax=docker/dockerfile:1
# One image for every dicomsafe service; the command picks the service:
#   docker run --read-only --tmpfs /tmp dicomsafe:dev services.crypto
#
# Why one image and not five: the services share every dependency and all of dicomsafe/common;
# per-service images would save little (pydicom/numpy in gateway, hvac in ingest) and cost five
# builds, five SBOMs and five CVE scans per release. Kubernetes and Compose pick the module.
#
# Runtime contract (Pod Security "restricted", readOnlyRootFilesystem):
#   - runs as uid/gid 10001, no capabilities, no setuid binaries needed;
#   - writes nothing outside mounted volumes: the hot store (CRYPTO_STORE_DIR) and /tmp
#     (an emptyDir / tmpfs); bytecode is compiled at build time and PYTHONDONTWRITEBYTECODE
#     stops any attempt at runtime;
#   - no compiler, no grpcio-tools, no pip or setuptools in the final image (the base image's
#     own pip is removed too).

# Pin by digest in your registry mirror for reproducible production builds.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: dependencies into a venv, protobuf code generated from proto/ ---------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src

# The runtime environment: only the [project] dependencies (no extras, not the project itself:
# it runs from /app), wheels only, so the build needs no compiler either.
COPY pyproject.toml ./
RUN python -m venv /opt/venv \
 && python -c "import tomllib; print('\\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > requirements.txt \
 && /opt/venv/bin/pip install --only-binary=:all: -r requirements.txt \
 && /opt/venv/bin/pip uninstall -y pip setuptools

# Code generation with grpcio-tools in a throwaway environment, never in /opt/venv.
COPY dicomsafe ./dicomsafe
COPY services ./services
COPY tools ./tools
COPY proto ./proto
RUN python -m venv /opt/codegen \
 && /opt/codegen/bin/pip install --only-binary=:all: "grpcio-tools==1.85.1" \
 && /opt/codegen/bin/python -m grpc_tools.protoc -I proto --python_out=. --grpc_python_out=. \
      proto/dicomsafe/v1/*.proto

# The application tree the services run from (tools/vault_setup reads deploy/vault/ relative
# to the repository root, so the code runs from /app, not from site-packages).
RUN mkdir -p /app/deploy \
 && cp -r dicomsafe services tools /app/ \
 && find /app -name '__pycache__' -prune -exec rm -rf {} + \
 && find /app -name '*.pyi' -delete
COPY deploy/vault /app/deploy/vault
COPY deploy/policy /app/deploy/policy
# Bytecode now, so a read-only root filesystem costs nothing at start-up. unchecked-hash:
# valid whatever timestamps the copy into the final stage gives the sources.
RUN python -m compileall -q --invalidation-mode unchecked-hash /app /opt/venv/lib

# --- runtime ---------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="dicomsafe" \
      org.opencontainers.image.description="dicomsafe services: ingest, crypto, authz, audit, gateway" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric identity (Kubernetes runAsNonRoot checks numbers); no home, no shell login.
# /var/lib/dicomsafe/*: mount points owned by that identity, so a fresh Compose named volume
# mounted there inherits the ownership (Kubernetes uses fsGroup instead). Nothing else is writable.
RUN groupadd --system --gid 10001 dicomsafe \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin dicomsafe \
 && mkdir -p /var/lib/dicomsafe/store /var/lib/dicomsafe/identities /var/lib/dicomsafe/secrets \
 && chown -R 10001:10001 /var/lib/dicomsafe \
 && chmod 0700 /var/lib/dicomsafe/store /var/lib/dicomsafe/identities \
 && python -m pip uninstall -y pip setuptools wheel
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=root:root /app /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONFAULTHANDLER=1 \
    HOME=/tmp \
    TMPDIR=/tmp
WORKDIR /app
USER 10001:10001
# Services drain in-flight calls on SIGTERM (the default stop signal).
ENTRYPOINT ["python", "-m"]
CMD ["services.gateway"]
