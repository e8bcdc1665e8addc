# syntax=docker/dockerfile:1
#
# ferrimesh: one image with the three binaries (ferrimesh-webhook,
# ferrimesh-operator, ferrimesh), static (musl), on distroless, non-root.
#
#   docker build -t ferrimesh/ferrimesh:0.1.0 .
#
# The build stage runs `make static`, the same command that builds and checks
# the static binaries outside a container. Cargo's registry and target
# directory are BuildKit cache mounts, so a source edit rebuilds only
# ferrimesh's own crates.
#
# config/manager and config/webhook run /ferrimesh-operator and
# /ferrimesh-webhook from this image.

FROM rust:1.95-bookworm AS builder
RUN apt-get update \
    && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/* \
    && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    make static DIST=/out

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=builder /out/ /
USER 65532:65532
ENTRYPOINT ["/ferrimesh-webhook"]
