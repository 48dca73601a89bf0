//! Generates the gRPC code from `proto/` with protox, a pure-Rust protobuf compiler, so no
//! system `protoc` is needed and nothing C++ is compiled.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files: Vec<PathBuf> = ["common", "broker", "icpcss", "itm", "irmds", "raft", "admin", "jobs"]
        .iter()
        .map(|name| root.join(format!("suanli/v1/{name}.proto")))
        .collect();
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let fds = protox::compile(&files, [&root])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
