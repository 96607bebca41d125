# Image ghcr.io/tensor-fusion-rs/tensor-fusion-node-agent:0.1.0 (values.yaml: image.registry + the component's
# image.repository, tag = the chart's appVersion). Build from the repository root:
#   docker build -f docker/node-agent.Dockerfile -t ghcr.io/tensor-fusion-rs/tensor-fusion-node-agent:0.1.0 .
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p tensor-fusion-node-agent --bin tensor-fusion-node-agent

# Root: the agent writes the root-owned host directory /run/tensor-fusion.
FROM gcr.io/distroless/cc-debian12
COPY --from=build /src/target/release/tensor-fusion-node-agent /usr/local/bin/tensor-fusion-node-agent
ENTRYPOINT ["/usr/local/bin/tensor-fusion-node-agent"]
