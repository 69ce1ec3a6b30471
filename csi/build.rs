//! Compiles the SnapshotMetadata gRPC API (`proto/schema.proto`) into Rust with protox, a
//! protobuf compiler written in Rust, so building needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/schema.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    // The server half is generated too: tests serve the API in process, and a driver written
    // in Rust could implement it.
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
