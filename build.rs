//! Link-time fixes for libtorch that tch's own build script cannot express.
//!
//! 1. Keep `libtorch_cuda.so` as a dependency of the binary. Nothing in our code
//!    references a symbol of it directly, so with the default `--as-needed` the
//!    linker drops it and CUDA is never registered at run time: the binary would
//!    silently run on CPU on a GPU machine. `--no-as-needed` around
//!    `-ltorch_cuda` keeps it; `tests/binary.rs` checks `readelf -d` lists it.
//! 2. Record the libtorch folder as a run path (RUNPATH, so `LD_LIBRARY_PATH`
//!    still wins: on the GPU machines and in the Docker image the libraries live
//!    elsewhere), so a binary built here runs without any environment set-up.
//! 3. Expose the libtorch version string to the code for `/api/v1/model`.
//! 4. Compile the CUDA shims, C++ that tch does not wrap, when libtorch has
//!    CUDA and the CUDA runtime headers sit beside it: `src/engine/cuda_stats.cpp`
//!    (the caching allocator's statistics) and `src/engine/cuda_graph.cpp`
//!    (CUDA graph capture and replay). The code then sees the cfg
//!    `stereo_recon_cuda_shims`.
//! 5. Compile `src/engine/buffer_pool.cpp` (the large CPU buffer pool in front
//!    of libtorch's CPU allocator) against the libtorch headers, always.

use std::env;
use std::fs;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo::rustc-check-cfg=cfg(stereo_recon_cuda_shims)");
    if env::var_os("CARGO_FEATURE_ENGINE").is_none() {
        return; // the pure core links no libtorch
    }
    // Set by torch-sys (`links = "tch"`, `cargo:libtorch_lib=...`).
    let lib = PathBuf::from(
        env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys did not report its libtorch folder (DEP_TCH_LIBTORCH_LIB)"),
    );
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
        println!("cargo:rustc-env=STEREO_RECON_LINKED_CUDA=1");
        compile_cuda_shims(&lib);
    } else {
        println!("cargo:rustc-env=STEREO_RECON_LINKED_CUDA=0");
    }
    compile_buffer_pool(&lib);
    println!("cargo:rustc-link-arg=-Wl,--enable-new-dtags");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());

    // PyPI's torch keeps `version.py` next to `lib/`; a plain libtorch zip has `build-version`.
    let root = lib.parent().map(PathBuf::from).unwrap_or_default();
    let version = fs::read_to_string(root.join("version.py"))
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| l.strip_prefix("__version__ = ").map(|v| v.trim_matches(['\'', '"']).to_owned()))
        })
        .or_else(|| fs::read_to_string(root.join("build-version")).ok().map(|v| v.trim().to_owned()))
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=STEREO_RECON_LIBTORCH_VERSION={version}");
}

/// Builds the large CPU buffer pool against the headers of the libtorch in `lib/..`.
fn compile_buffer_pool(lib: &std::path::Path) {
    println!("cargo:rerun-if-changed=src/engine/buffer_pool.cpp");
    let include = lib.parent().expect("libtorch lib folder has a parent").join("include");
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("src/engine/buffer_pool.cpp")
        .include(&include)
        .warnings(false)
        .compile("stereo_recon_buffer_pool");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=c10");
}

/// Builds the CUDA shims against the headers of the libtorch in `lib/..` and
/// the CUDA runtime headers of the wheel's `nvidia` packages.
fn compile_cuda_shims(lib: &std::path::Path) {
    println!("cargo:rerun-if-changed=src/engine/cuda_stats.cpp");
    println!("cargo:rerun-if-changed=src/engine/cuda_graph.cpp");
    let torch = lib.parent().expect("libtorch lib folder has a parent");
    let include = torch.join("include");
    // A complete set of CUDA runtime headers from the wheel's dependencies:
    // nvidia/<package>/include (complete in some CUDA versions) or triton's copy.
    let site_packages = torch.parent().map(PathBuf::from).unwrap_or_default();
    let nvidia =
        fs::read_dir(site_packages.join("nvidia")).into_iter().flatten().flatten().map(|e| e.path().join("include"));
    let cuda_include = nvidia
        .chain(std::iter::once(site_packages.join("triton/backends/nvidia/include")))
        .find(|p| p.join("cuda_runtime_api.h").is_file() && p.join("crt/host_config.h").is_file());
    let (Some(cuda_include), true) = (cuda_include, include.join("c10/cuda/CUDACachingAllocator.h").is_file()) else {
        println!(
            "cargo:warning=CUDA runtime headers not found beside libtorch: no CUDA allocator metrics, no CUDA graphs"
        );
        return;
    };
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("src/engine/cuda_stats.cpp")
        .file("src/engine/cuda_graph.cpp")
        .include(&include)
        .include(&cuda_include)
        .warnings(false)
        .compile("stereo_recon_cuda_shims");
    println!("cargo:rustc-link-lib=dylib=torch_cuda");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10_cuda");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-cfg=stereo_recon_cuda_shims");
}
