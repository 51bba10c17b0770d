//! Compiles the vendored cluster-autoscaler `externalgrpc.proto` with protox (no `protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["externalgrpc.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // The Kubernetes messages come from k8s-pb, generated from the complete upstream
        // protos; the files under proto/k8s.io only let protox resolve the names.
        .extern_path(".k8s.io.api.core.v1", "::k8s_pb::api::core::v1")
        .extern_path(
            ".k8s.io.apimachinery.pkg.apis.meta.v1",
            "::k8s_pb::apimachinery::pkg::apis::meta::v1",
        )
        .compile_fds(fds)?;
    Ok(())
}
