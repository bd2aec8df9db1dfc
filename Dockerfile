# One image for every leadscore service (scorer, drift, retrain trigger, training
# worker, lifecycle controller, lookup, dashboard, webhook) and the training job.
#
#   docker build -t leadscore:0.1.0 .            # anywhere with a registry (the CI workflow)
#   make image                                   # here: podman, a Debian base from mmdebstrap,
#                                                # the binary built on the host (deploy/image/build.sh)
#
# The build arguments let the local build swap the two base images and the stage the binary
# comes from for local ones; the runtime stage is the same either way. Versions follow
# DEPENDENCIES and training/requirements.txt.
ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=python:3.11-slim-bookworm
# The stage or image holding /src/target/release/leadscore.
ARG BINARY_FROM=build

# --- build: the Rust binary -------------------------------------------------
FROM ${RUST_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake libssl-dev libsasl2-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates crates
COPY tests tests
COPY vendor vendor
COPY proto proto
COPY schemas schemas
COPY topics topics
COPY connectors connectors
COPY models models
RUN cargo build --release -p leadscore --locked \
 && strip target/release/leadscore

FROM ${BINARY_FROM} AS binary

# --- runtime: binary, ONNX Runtime (from the onnxruntime wheel), training job --
FROM ${RUNTIME_IMAGE} AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --create-home --shell /usr/sbin/nologin leadscore
COPY training/requirements.txt /opt/leadscore/training/requirements.txt
RUN python3 -m venv /opt/leadscore/venv \
 && /opt/leadscore/venv/bin/pip install --no-cache-dir -r /opt/leadscore/training/requirements.txt
COPY --from=binary /src/target/release/leadscore /usr/local/bin/leadscore
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
