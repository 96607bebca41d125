# Image ghcr.io/tensor-fusion-rs/tensor-fusion-interposer:0.1.0: carries
# libtensor_fusion_interposer.so and a shell; the node agent's init container copies the
# library to /opt/tensor-fusion/lib on the host. Build from the repository root:
#   docker build -f docker/interposer.Dockerfile -t ghcr.io/tensor-fusion-rs/tensor-fusion-interposer:0.1.0 .
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p tensor-fusion-interposer

FROM docker.io/library/busybox:1.37-glibc
COPY --from=build /src/target/release/libtensor_fusion_interposer.so /opt/tensor-fusion/lib/
