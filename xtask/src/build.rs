//! Builds: the kernel object with the nightly toolchain into a persistent target directory
//! (cargo rebuilds it only when its sources change), then the user-space binaries, which
//! embed it.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Result, bail};

use crate::setup::{self, NIGHTLY, Tools, clean_command, status};

pub const BPF_TARGET: &str = "bpfel-unknown-none";

/// The workspace's target directory.
pub fn target_dir(ws: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| ws.join("target"), PathBuf::from)
}

/// Where the kernel build keeps its own target directory (never shared with stable builds).
fn ebpf_target_dir(ws: &Path) -> PathBuf {
    target_dir(ws).join("ebpf")
}

/// The built kernel object.
pub fn object_path(ws: &Path) -> PathBuf {
    ebpf_target_dir(ws)
        .join(BPF_TARGET)
        .join("release")
        .join("weft-ebpf")
}

/// Flags of every crate of the kernel build, `core` and `compiler_builtins` included: debug
/// info everywhere, so bpf-linker's `--btf` gives every function (`memcpy` too) its BTF.
/// With a function lacking it, the kernel refuses a program calling it ("number of funcs in
/// func_info doesn't match number of subprogs"). BTF is what BTF-defined maps (socket
/// storage, maps of maps) need.
const KERNEL_RUSTFLAGS: &str = "-C\x1fdebuginfo=2\x1f-C\x1flink-arg=--btf";

/// `cargo +nightly <subcommand>` for the kernel crate.
pub fn nightly_cargo(ws: &Path, tools: &Tools, subcommand: &str) -> Command {
    let mut c = clean_command("cargo");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![tools.bpf_linker_dir.clone()];
    paths.extend(std::env::split_paths(&path));
    c.current_dir(ws)
        .arg(format!("+{NIGHTLY}"))
        .arg(subcommand)
        .args([
            "-p",
            "weft-ebpf",
            "--release",
            "--target",
            BPF_TARGET,
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(ebpf_target_dir(ws))
        .env("CARGO_ENCODED_RUSTFLAGS", KERNEL_RUSTFLAGS)
        .env("PATH", std::env::join_paths(paths).unwrap_or(path));
    c
}

/// `cargo <subcommand>` for user space, pointed at the built kernel object.
pub fn stable_cargo(ws: &Path, subcommand: &str) -> Command {
    let mut c = clean_command("cargo");
    c.current_dir(ws)
        .arg(subcommand)
        .env("WEFT_EBPF_OBJECT", object_path(ws));
    c
}

/// Builds the kernel object; returns its path.
pub fn ebpf(ws: &Path, tools: &Tools) -> Result<PathBuf> {
    status(&mut nightly_cargo(ws, tools, "build"))?;
    let object = object_path(ws);
    if !object.is_file() {
        bail!(
            "the kernel build succeeded but {} is missing",
            object.display()
        );
    }
    Ok(object)
}

/// Where the user-space binaries land.
pub fn bin_dir(ws: &Path, release: bool) -> PathBuf {
    target_dir(ws).join(if release { "release" } else { "debug" })
}

/// Builds everything; returns the directory holding `weft` and `weft-pod`.
pub fn all(ws: &Path, tools: &Tools, release: bool) -> Result<PathBuf> {
    ebpf(ws, tools)?;
    let mut c = stable_cargo(ws, "build");
    c.args(["-p", "weft", "-p", "weft-testkit", "--bins"]);
    if release {
        c.arg("--release");
    }
    setup::status(&mut c)?;
    Ok(bin_dir(ws, release))
}
