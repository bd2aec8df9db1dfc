# One image for every leadscore service (scorer, drift, retrain trigger, training
# worker, lifecycle controller, lookup) and the training job.
#
#   docker build -t leadscore:0.1.0 .
#
# Not built in this repository's CI (its machines have no container engine); the
# Helm chart's tests do not depend on it. Versions follow DEPENDENCIES and
# training/requirements.txt.

# --- build: the Rust binary -------------------------------------------------
FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake libssl-dev libsasl2-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates crates
COPY tests tests
COPY proto proto
COPY schemas schemas
COPY topics topics
COPY connectors connectors
COPY models models
RUN cargo build --release -p leadscore --locked \
 && strip target/release/leadscore

# --- runtime: binary, ONNX Runtime (from the onnxruntime wheel), training job --
FROM python:3.11-slim-bookworm AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --create-home --shell /usr/sbin/nologin leadscore
COPY training/requirements.txt /opt/leadscore/training/requirements.txt
RUN python -m venv /opt/leadscore/venv \
 && /opt/leadscore/venv/bin/pip install --no-cache-dir -r /opt/leadscore/training/requirements.txt
COPY --from=build /src/target/release/leadscore /usr/local/bin/leadscore
COPY models /opt/leadscore/models
COPY training /opt/leadscore/training
COPY schemas /opt/leadscore/schemas
COPY topics /opt/leadscore/topics
COPY connectors /opt/leadscore/connectors
ENV ORT_DYLIB_PATH=/opt/leadscore/venv/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1 \
    LEADSCORE_PYTHON=/opt/leadscore/venv/bin/python \
    LEADSCORE__SCORER__CHAMPION_MODEL=/opt/leadscore/models/default \
    LEADSCORE__TRAINING__PYTHON=/opt/leadscore/venv/bin/python \
    LEADSCORE__TRAINING__DIR=/opt/leadscore/training \
    LEADSCORE_LOG=info \
    HOME=/tmp
WORKDIR /opt/leadscore
# Non-root; the root file system can be mounted read-only (scratch space: /tmp).
USER 10001:10001
ENTRYPOINT ["/usr/local/bin/leadscore"]
CMD ["--help"]
