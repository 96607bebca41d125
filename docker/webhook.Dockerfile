# Image ghcr.io/tensor-fusion-rs/tensor-fusion-webhook:0.1.0 (values.yaml: image.registry + the component's
# image.repository, tag = the chart's appVersion). Build from the repository root:
#   docker build -f docker/webhook.Dockerfile -t ghcr.io/tensor-fusion-rs/tensor-fusion-webhook:0.1.0 .
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p tensor-fusion-webhook --bin tensor-fusion-webhook

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/tensor-fusion-webhook /usr/local/bin/tensor-fusion-webhook
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/tensor-fusion-webhook"]
