//! Compiles `proto/*.proto` into Rust with protox (a pure-Rust protobuf compiler), so a
//! fresh machine needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/common.proto",
        "proto/storage.proto",
        "proto/coordinator.proto",
    ];
    for proto in &protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        // Keys and values as `bytes::Bytes`: a decoded value shares the received buffer, and
        // sending one value to every replica clones a reference, not the bytes.
        .bytes(".")
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
