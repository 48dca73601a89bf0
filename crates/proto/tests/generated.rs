//! The code generated from `proto/suanli/v1` is checked in (`src/gen/suanli.v1.rs`) rather than
//! made by a build script: clones sharing one target directory (`/var/tmp/suanli-target`)
//! share build-script outputs, and cargo's mtime rule let one clone's generated code serve
//! another's. This test regenerates it and fails when the checked-in copy differs.
//!
//! After changing a `.proto`: `SUANLI_REGENERATE=1 cargo test -p suanli-proto --test generated`
//! writes the new code; commit it with the change.

use std::path::{Path, PathBuf};

const PROTOS: [&str; 8] = ["common", "broker", "icpcss", "itm", "irmds", "raft", "admin", "jobs"];

#[test]
fn the_checked_in_code_is_what_the_protos_generate() {
    let package = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = package.join("../../proto");
    let files: Vec<PathBuf> = PROTOS.iter().map(|name| root.join(format!("suanli/v1/{name}.proto"))).collect();
    let fds = protox::compile(&files, [&root]).expect("the protos compile");
    let out = tempfile::tempdir().expect("dir");
    tonic_prost_build::configure().build_client(true).build_server(true).out_dir(out.path()).compile_fds(fds).expect("generate");
    let fresh = std::fs::read_to_string(out.path().join("suanli.v1.rs")).expect("generated code");
    let checked_in = package.join("src/gen/suanli.v1.rs");
    if std::env::var_os("SUANLI_REGENERATE").is_some() {
        std::fs::write(&checked_in, &fresh).expect("write the generated code");
        return;
    }
    let current = std::fs::read_to_string(&checked_in).unwrap_or_default();
    assert!(
        current == fresh,
        "src/gen/suanli.v1.rs is not what proto/ generates: run `SUANLI_REGENERATE=1 cargo test -p suanli-proto --test generated` and commit it"
    );
}
