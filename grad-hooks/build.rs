//! Compiles `src/hooks.cpp` and `src/recompute.cpp` against the headers of the libtorch that `torch-sys` links (handed over as
//! `DEP_TCH_LIBTORCH_LIB`, its `lib` folder; the headers are the sibling `include`), with the flags `torch-sys`
//! compiles its own C++ with, and bakes in the rpath as `build/libtorch_rpath.rs` does for the other crates.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=src/hooks.cpp");
    println!("cargo:rerun-if-changed=src/recompute.cpp");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        panic!("DEP_TCH_LIBTORCH_LIB is not set: torch-sys did not report its libtorch (see scripts/setup.sh)");
    };
    let lib = PathBuf::from(lib);
    let include = lib.parent().map(|p| p.join("include")).unwrap_or_default();
    if !include.join("torch/csrc/autograd/variable.h").exists() {
        panic!(
            "libtorch headers not found at {} (the torch wheel ships them; a libtorch without headers cannot \
             build the gradient hooks)",
            include.display()
        );
    }
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("src/hooks.cpp")
        .file("src/recompute.cpp");
    // torch-sys's own switch; unset, the compiler's default (the new ABI, which the PyPI wheels use since 2.7).
    if let Ok(abi) = std::env::var("LIBTORCH_CXX11_ABI") {
        build.flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"));
    }
    build.compile("m3d_grad_hooks");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-L{}", lib.display());
    println!("cargo:rustc-link-arg=-ltorch");
}
