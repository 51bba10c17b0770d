# syntax=docker/dockerfile:1
# The kube-node image: the one `kube-node` binary on a distroless base, running as non-root.
#
# Build and push (from the repository root):
#
#   docker build -t kube-node:dev .
#   docker tag kube-node:dev registry.example.com/kube-node:v0.1.0
#   docker push registry.example.com/kube-node:v0.1.0
#
# `kube-node:dev` is the image deploy/kustomization.yaml names; point it at your registry with
# `cd deploy && kustomize edit set image kube-node=registry.example.com/kube-node:v0.1.0`.

# Build stage: the same toolchain and lock file as CI; `--locked` fails instead of resolving
# different dependency versions than the ones CI tested.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p kube-node \
    && install -D -m 0755 target/release/kube-node /out/kube-node

# Runtime stage: glibc and CA certificates only (the binary links ring and libc dynamically;
# no shell, no package manager). The `nonroot` variant runs as UID/GID 65532, the user
# deploy/deployment.yaml requires with runAsNonRoot.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/kube-node /usr/local/bin/kube-node
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kube-node"]
CMD ["run"]
