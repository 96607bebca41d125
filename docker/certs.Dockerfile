# Image ghcr.io/tensor-fusion-rs/tensor-fusion-certs:0.1.0 (values.yaml: image.registry + the component's
# image.repository, tag = the chart's appVersion). Build from the repository root:
#   docker build -f docker/certs.Dockerfile -t ghcr.io/tensor-fusion-rs/tensor-fusion-certs:0.1.0 .
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p tensor-fusion-certs --bin tensor-fusion-certs

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/tensor-fusion-certs /usr/local/bin/tensor-fusion-certs
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/tensor-fusion-certs"]
