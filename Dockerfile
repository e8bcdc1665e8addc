# ferrimesh: one image with the three binaries (ferrimesh-webhook,
# ferrimesh-operator, ferrimesh), static, on distroless, non-root.
#
#   docker build -t ferrimesh/ferrimesh:0.1.0 .
#
# config/manager and config/webhook run /ferrimesh-operator and
# /ferrimesh-webhook from this image.

FROM rust:1.95-bookworm AS builder
RUN apt-get update \
    && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/* \
    && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
COPY crds/Cargo.toml crds/Cargo.toml
COPY webhook/Cargo.toml webhook/Cargo.toml
COPY operator/Cargo.toml operator/Cargo.toml
COPY e2e/Cargo.toml e2e/Cargo.toml
RUN cargo fetch --locked
COPY . .
RUN cargo build --release --locked --target x86_64-unknown-linux-musl \
        -p ferrimesh-webhook -p ferrimesh-operator --bins \
    && mkdir /out \
    && cp target/x86_64-unknown-linux-musl/release/ferrimesh-webhook \
          target/x86_64-unknown-linux-musl/release/ferrimesh-operator \
          target/x86_64-unknown-linux-musl/release/ferrimesh /out/

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=builder /out/ /
USER 65532:65532
ENTRYPOINT ["/ferrimesh-webhook"]
