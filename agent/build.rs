//! Locates weft's kernel object for `include_bytes_aligned!`. It is built by
//! `cargo xtask build-ebpf` (nightly, bpfel-unknown-none) into a persistent target directory;
//! this script does not build it, so plain `cargo build` stays fast and stable-only.
use std::{env, path::PathBuf};

fn main() {
    println!("cargo::rerun-if-env-changed=WEFT_EBPF_OBJECT");
    println!("cargo::rerun-if-env-changed=CARGO_TARGET_DIR");
    let object = env::var_os("WEFT_EBPF_OBJECT").map_or_else(default_object, PathBuf::from);
    println!("cargo::rerun-if-changed={}", object.display());
    if !object.is_file() {
        println!(
            "cargo::error=weft's kernel programs are not built: {} is missing. Run `cargo xtask \
             build` (or `cargo xtask build-ebpf`) first; it builds them with the nightly \
             toolchain and bpf-linker.",
            object.display()
        );
        return;
    }
    println!("cargo::rustc-env=WEFT_EBPF_OBJECT={}", object.display());
}

fn default_object() -> PathBuf {
    let target = env::var_os("CARGO_TARGET_DIR").map_or_else(
        || {
            let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
            manifest.join("..").join("target")
        },
        PathBuf::from,
    );
    target
        .join("ebpf")
        .join("bpfel-unknown-none")
        .join("release")
        .join("weft-ebpf")
}
