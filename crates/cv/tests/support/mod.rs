//! Shared by the libtorch tests: where ops/setup-torch put the real test data.

use std::path::PathBuf;

/// `SUANLI_CV_DATA`, or `None` (and a note) when this run has no data: the test then skips,
/// as the PostgreSQL tests do without a server; .ci/run always sets it.
pub fn data_dir() -> Option<PathBuf> {
    let d = std::env::var_os("SUANLI_CV_DATA").map(PathBuf::from);
    if d.is_none() {
        eprintln!("SUANLI_CV_DATA is not set (ops/setup-torch writes the data); skipping");
    }
    d
}
