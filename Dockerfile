# One image for every dicomsafe service; the command picks the service:
#   docker run dicomsafe services.crypto
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY dicomsafe ./dicomsafe
COPY services ./services
COPY tools ./tools
RUN pip install --no-cache-dir '.[dev]' \
 && python -m grpc_tools.protoc -I proto --python_out=. --grpc_python_out=. proto/dicomsafe/v1/*.proto \
 && pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
# A fixed non-root identity; the hot store volume must be writable by it.
RUN useradd --system --uid 10001 --home-dir /app dicomsafe
WORKDIR /app
COPY --from=build /install /usr/local
COPY --from=build /src/dicomsafe ./dicomsafe
COPY --from=build /src/services ./services
COPY --from=build /src/tools ./tools
COPY deploy/policy ./deploy/policy
COPY deploy/vault ./deploy/vault
USER 10001
ENV PYTHONUNBUFFERED=1
ENTRYPOINT ["python", "-m"]
