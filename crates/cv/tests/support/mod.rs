//! Shared by the libtorch tests: where ops/setup-torch put the real test data.

use std::path::PathBuf;

/// `SUANLI_CV_DATA`, or `None` (and a note) when this run has no data: the test then skips
/// on a developer's machine; under CI (`CI=true`, where .ci/run always sets it) a missing
/// variable fails the test instead of letting it pass having checked nothing.
pub fn data_dir() -> Option<PathBuf> {
    let d = std::env::var_os("SUANLI_CV_DATA").map(PathBuf::from);
    if d.is_none() {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "SUANLI_CV_DATA is not set under CI=true (ops/setup-torch writes the data)");
        eprintln!("SUANLI_CV_DATA is not set (ops/setup-torch writes the data); skipping");
    }
    d
}
