//! Generates the gRPC code from `proto/` with protox, a pure-Rust protobuf compiler, so no
//! system `protoc` is needed and nothing C++ is compiled.
//!
//! Several clones may share one target directory (`/var/tmp/suanli-target`), and cargo hashes
//! a workspace member by its path relative to the workspace, so they share this script's build
//! too. Nothing here may name the clone it was compiled in: the package root is read when the
//! script runs (not `env!` at compile time), and the inputs are declared relative to it, so
//! cargo checks each clone's own `.proto` files.

use std::path::PathBuf;

const PROTOS: [&str; 8] = ["common", "broker", "icpcss", "itm", "irmds", "raft", "admin", "jobs"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let package = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root = package.join("../../proto");
    let relative: Vec<String> = PROTOS.iter().map(|name| format!("../../proto/suanli/v1/{name}.proto")).collect();
    for file in &relative {
        // Relative to the package root: this clone's files, whichever clone built last.
        println!("cargo:rerun-if-changed={file}");
    }
    let files: Vec<PathBuf> = relative.iter().map(|file| package.join(file)).collect();
    let fds = protox::compile(&files, [&root])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
