//! Generates the gRPC contracts from `proto/` with protoc
//! (`apt-get install protobuf-compiler`; scripts/deps.sh installs it).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(
            &[
                "proto/istio/v1/auth/ca.proto",
                "proto/mizzen/discovery/v1/discovery.proto",
            ],
            &["proto"],
        )
        .map_err(|e| {
            format!("cannot compile protos (is protoc installed? apt-get install protobuf-compiler): {e}").into()
        })
}
