//! `cargo xtask setup`: installs what is missing and says what it did and what was already
//! there. Idempotent, and fast when everything is present (every other command runs it).
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

/// The nightly toolchain that builds the kernel crate (`-Z build-std=core`).
pub const NIGHTLY: &str = "nightly";
/// bpf-linker, built against the nightly's own libLLVM.
pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages the tests, the demo and the benchmarks use.
/// `prometheus` is there for `promtool check metrics`; its server is never started (see
/// `debian_packages`).
const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "iptables",
    "nftables",
    "bpftool",
    "procps",
    "prometheus",
    // `openssl x509`: a test reads the mesh root's fingerprint with a tool of its own.
    "openssl",
];

/// Tells Debian's maintainer scripts not to start services while it exists.
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";
const BPFFS: &str = "/sys/fs/bpf";

/// What later steps need from set-up.
#[derive(Debug, Clone)]
pub struct Tools {
    /// Directory holding the `bpf-linker` binary.
    pub bpf_linker_dir: PathBuf,
    /// The manifest validators (`cargo xtask test` checks deploy/ with them); None for a
    /// build-only setup.
    pub manifests: Option<ManifestTools>,
}

/// Pinned validators for deploy/, installed under the tools directory.
#[derive(Debug, Clone)]
pub struct ManifestTools {
    /// A Python virtualenv's `bin` with `yamllint` and `kubernetes-validate`.
    pub venv_bin: PathBuf,
    /// `node_modules` holding `@kubernetes-models/prometheus-operator`.
    pub node_modules: PathBuf,
}

const YAMLLINT: &str = "yamllint==1.38.0";
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
const PROMETHEUS_OPERATOR_MODELS: &str = "@kubernetes-models/prometheus-operator@6.0.0";

#[derive(Debug, Default)]
struct Report {
    lines: Vec<(String, String)>,
    changed: bool,
}

impl Report {
    fn present(&mut self, what: impl Into<String>, detail: impl Into<String>) {
        self.lines
            .push((what.into(), format!("present ({})", detail.into())));
    }

    fn did(&mut self, what: impl Into<String>, detail: impl Into<String>) {
        self.changed = true;
        self.lines.push((what.into(), detail.into()));
    }

    fn print(&self) {
        if !self.changed {
            let names: Vec<&str> = self.lines.iter().map(|(w, _)| w.as_str()).collect();
            eprintln!("setup: everything present ({})", names.join(", "));
            return;
        }
        eprintln!("setup:");
        for (what, detail) in &self.lines {
            eprintln!("  {what:<28} {detail}");
        }
    }
}

pub fn run(_ws: &Path) -> Result<Tools> {
    let mut report = Report::default();
    nightly(&mut report)?;
    let bpf_linker_dir = bpf_linker(&mut report)?;
    debian_packages(&mut report)?;
    bpffs(&mut report)?;
    let manifests = manifest_tools(&mut report)?;
    report.print();
    Ok(Tools {
        bpf_linker_dir,
        manifests: Some(manifests),
    })
}

/// Only what building needs (the nightly and bpf-linker): a container build has no bpffs and
/// runs no tests.
pub fn for_build(_ws: &Path) -> Result<Tools> {
    let mut report = Report::default();
    nightly(&mut report)?;
    let bpf_linker_dir = bpf_linker(&mut report)?;
    report.print();
    Ok(Tools {
        bpf_linker_dir,
        manifests: None,
    })
}

/// yamllint and kubernetes-validate (PyPI, in a virtualenv) and the prometheus-operator models
/// (npm), each pinned; a version change reinstalls into a new directory.
fn manifest_tools(report: &mut Report) -> Result<ManifestTools> {
    let base = cache_dir().join("manifests");
    let tag = |s: &str| s.replace(['=', '@', '/'], "_");
    let venv = base.join(format!(
        "venv-{}-{}",
        tag(YAMLLINT),
        tag(KUBERNETES_VALIDATE)
    ));
    let venv_bin = venv.join("bin");
    if venv_bin.join("yamllint").exists() && venv_bin.join("kubernetes-validate").exists() {
        report.present("yamllint, kubernetes-validate", venv.display().to_string());
    } else {
        std::fs::create_dir_all(&base).with_context(|| format!("create {}", base.display()))?;
        status(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
        status(Command::new(venv_bin.join("pip")).args([
            "install",
            "-q",
            "--disable-pip-version-check",
            YAMLLINT,
            KUBERNETES_VALIDATE,
        ]))?;
        report.did(
            "yamllint, kubernetes-validate",
            format!("installed into {}", venv.display()),
        );
    }
    let npm_dir = base.join(format!("npm-{}", tag(PROMETHEUS_OPERATOR_MODELS)));
    let node_modules = npm_dir.join("node_modules");
    if node_modules
        .join("@kubernetes-models/prometheus-operator")
        .exists()
    {
        report.present("prometheus-operator models", npm_dir.display().to_string());
    } else {
        std::fs::create_dir_all(&npm_dir)
            .with_context(|| format!("create {}", npm_dir.display()))?;
        status(
            Command::new("npm")
                .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
                .arg(&npm_dir)
                .arg(PROMETHEUS_OPERATOR_MODELS),
        )?;
        report.did(
            "prometheus-operator models",
            format!("installed into {}", npm_dir.display()),
        );
    }
    // Not installable here (neither Debian nor PyPI/npm ship kustomize v5): report it, and the
    // manifests step fails naming it when it is missing.
    match Command::new("kubectl")
        .args(["version", "--client"])
        .output()
    {
        Ok(o) if o.status.success() => {
            let version = String::from_utf8_lossy(&o.stdout);
            let line = version
                .lines()
                .find(|l| l.contains("Kustomize"))
                .unwrap_or("");
            report.present("kubectl (kustomize)", line.trim().to_owned());
        }
        _ => report.present(
            "kubectl (kustomize)",
            "MISSING: `cargo xtask manifests` and `test` need kubectl with kustomize v5",
        ),
    }
    Ok(ManifestTools {
        venv_bin,
        node_modules,
    })
}

/// A command with the variables that an outer `cargo`/rustup proxy set removed, so the inner
/// toolchain selection (`+nightly`) and target directory are ours.
pub fn clean_command(program: &str) -> Command {
    let mut c = Command::new(program);
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTDOC",
        "RUSTC_WRAPPER",
        "CARGO",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
    ] {
        c.env_remove(var);
    }
    c
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn status(cmd: &mut Command) -> Result<()> {
    let st = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed ({st})");
    }
    Ok(())
}

fn nightly(report: &mut Report) -> Result<()> {
    let toolchains = output(clean_command("rustup").args(["toolchain", "list"]))?;
    if !toolchains
        .lines()
        .any(|l| l.starts_with(&format!("{NIGHTLY}-")))
    {
        status(clean_command("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
        ]))?;
        report.did("nightly toolchain", "installed");
    }
    let installed = output(clean_command("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        NIGHTLY,
    ]))?;
    for component in ["rust-src", "clippy"] {
        if installed.lines().any(|l| l.starts_with(component)) {
            report.present(format!("{component} ({NIGHTLY})"), "rustup component");
        } else {
            status(clean_command("rustup").args([
                "component",
                "add",
                component,
                "--toolchain",
                NIGHTLY,
            ]))?;
            report.did(format!("{component} ({NIGHTLY})"), "installed with rustup");
        }
    }
    Ok(())
}

/// Facts about the nightly toolchain that bpf-linker is built against.
struct NightlyLlvm {
    commit: String,
    sysroot: PathBuf,
    llvm_major: String,
    /// `LLVM-22-rust-1.97.0-nightly` for `-l`.
    lib: String,
}

fn nightly_llvm() -> Result<NightlyLlvm> {
    let vv = output(clean_command("rustc").args([&format!("+{NIGHTLY}"), "-vV"]))?;
    let field = |name: &str| {
        vv.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .with_context(|| format!("`rustc +{NIGHTLY} -vV` has no {name}"))
    };
    let commit: String = field("commit-hash:")?.chars().take(9).collect();
    let llvm_major = field("LLVM version:")?
        .split('.')
        .next()
        .unwrap_or_default()
        .to_owned();
    let sysroot = PathBuf::from(
        output(clean_command("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"]))?.trim(),
    );
    let libdir = sysroot.join("lib");
    let lib = fs::read_dir(&libdir)
        .with_context(|| format!("read {}", libdir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find_map(|name| {
            name.strip_prefix("lib")
                .and_then(|n| n.strip_suffix(".so"))
                .filter(|n| n.starts_with("LLVM-"))
                .map(str::to_owned)
        })
        .with_context(|| format!("no libLLVM-*.so in {}", libdir.display()))?;
    Ok(NightlyLlvm {
        commit,
        sysroot,
        llvm_major,
        lib,
    })
}

fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("WEFT_TOOLS_DIR") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache"),
        PathBuf::from,
    );
    base.join("weft").join("tools")
}

fn bpf_linker(report: &mut Report) -> Result<PathBuf> {
    let llvm = nightly_llvm()?;
    // One build per nightly: the binary links that nightly's libLLVM by rpath.
    let root = cache_dir().join(format!("bpf-linker-{BPF_LINKER_VERSION}-{}", llvm.commit));
    let bin_dir = root.join("bin");
    let bin = bin_dir.join("bpf-linker");
    let works = |bin: &Path| {
        Command::new(bin)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if bin.is_file() && works(&bin) {
        report.present(
            format!("bpf-linker {BPF_LINKER_VERSION}"),
            bin.display().to_string(),
        );
        return Ok(bin_dir);
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against {}'s libLLVM ({}); this takes a minute or two",
        NIGHTLY, llvm.lib
    );
    let libdir = llvm.sysroot.join("lib");
    let rustflags = format!(
        "-C link-arg=-L{dir} -C link-arg=-l{lib} -C link-arg=-Wl,-rpath,{dir}",
        dir = libdir.display(),
        lib = llvm.lib
    );
    status(
        clean_command("cargo")
            .arg(format!("+{NIGHTLY}"))
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--no-default-features",
            ])
            .args([
                "--features",
                &format!("llvm-{},no-llvm-linking", llvm.llvm_major),
            ])
            .arg("--root")
            .arg(&root)
            .env("RUSTFLAGS", rustflags),
    )
    .context("building bpf-linker")?;
    if !works(&bin) {
        bail!(
            "bpf-linker was built but `{} --version` fails",
            bin.display()
        );
    }
    report.did(
        format!("bpf-linker {BPF_LINKER_VERSION}"),
        format!("built into {}", bin.display()),
    );
    Ok(bin_dir)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn debian_packages(report: &mut Report) -> Result<()> {
    let installed = |pkg: &str| {
        Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", pkg])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
    };
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        report.present("debian packages", DEBIAN_PACKAGES.join(" "));
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {missing:?}: run `cargo xtask setup` as root to install them"
        );
    }
    status(
        Command::new("apt-get")
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    // Installing `prometheus` would start a Prometheus server on a machine with an init
    // system: a policy-rc.d that denies every start prevents it (an existing one is kept).
    let own_policy = !Path::new(POLICY_RC_D).exists();
    if own_policy {
        std::fs::write(POLICY_RC_D, "#!/bin/sh\nexit 101\n")
            .with_context(|| format!("write {POLICY_RC_D}"))?;
        std::fs::set_permissions(
            POLICY_RC_D,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .with_context(|| format!("chmod {POLICY_RC_D}"))?;
    }
    let installed = status(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    );
    if own_policy {
        let _ = std::fs::remove_file(POLICY_RC_D);
    }
    installed?;
    report.did(
        "debian packages",
        format!("installed {}", missing.join(" ")),
    );
    Ok(())
}

fn bpffs(report: &mut Report) -> Result<()> {
    if weft_testkit::node::is_bpffs(Path::new(BPFFS)) {
        report.present("bpffs", BPFFS);
        return Ok(());
    }
    if !is_root() {
        bail!("{BPFFS} is not a bpffs mount: run `cargo xtask setup` as root to mount it");
    }
    fs::create_dir_all(BPFFS).with_context(|| format!("create {BPFFS}"))?;
    status(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))?;
    report.did("bpffs", format!("mounted at {BPFFS}"));
    Ok(())
}
