//! With the `torch` feature, our binaries, tests and benches find libtorch where the build
//! found it (a run path, searched after `LD_LIBRARY_PATH`, so another machine's libtorch of the
//! same version can be pointed at instead). torch-sys tells its direct dependents where that is.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
