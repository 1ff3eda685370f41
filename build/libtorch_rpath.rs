//! Shared build script for every crate whose binaries or tests link libtorch.
//!
//! `torch-sys` (links = "tch") hands its library folder to the build scripts of crates that depend on it
//! directly as `DEP_TCH_LIBTORCH_LIB`. Baking it in as an rpath lets `m3d` and the test binaries run with
//! no `LD_LIBRARY_PATH`; `--no-as-needed` keeps `libtorch` (and through it `libtorch_cuda`) linked even
//! where no symbol is referenced directly, so CUDA is found on GPU machines.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{lib}");
        println!("cargo:rustc-link-arg=-ltorch");
    }
}
