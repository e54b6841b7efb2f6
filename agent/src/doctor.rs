//! What the agent needs from the node, checked one by one: `weft doctor` prints every check
//! (and the verifier log of any program that does not load); `weft agent` runs the quick ones
//! first and refuses to start naming what is missing.
use std::path::{Path, PathBuf};

use serde::Serialize;

/// One check's result.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
    /// The verifier's log, for a program that did not load.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verifier_log: Option<String>,
}

impl Check {
    fn new(name: impl Into<String>, ok: bool, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ok,
            detail: detail.into(),
            verifier_log: None,
        }
    }
}

/// Capability numbers (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The effective capability set from a /proc/<pid>/status text.
pub fn effective_caps(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// Which of the capabilities the agent needs are missing from `caps`. CAP_SYS_ADMIN stands
/// in for CAP_BPF and CAP_PERFMON, as the kernel accepts it for them.
pub fn missing_caps(caps: u64) -> Vec<&'static str> {
    let has = |bit: u32| caps & (1 << bit) != 0;
    let sys_admin = has(CAP_SYS_ADMIN);
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !sys_admin {
        missing.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) && !sys_admin {
        missing.push("CAP_PERFMON");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    missing
}

/// The checks that need no program load: capabilities, cgroup v2, bpffs, BTF.
pub fn quick(bpffs: &Path, cgroup_root: Option<&Path>) -> Vec<Check> {
    let mut out = Vec::new();
    let caps = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| effective_caps(&s));
    out.push(match caps {
        Some(c) => {
            let missing = missing_caps(c);
            Check::new(
                "capabilities",
                missing.is_empty(),
                if missing.is_empty() {
                    "CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (or CAP_SYS_ADMIN)".to_owned()
                } else {
                    format!("missing {}", missing.join(", "))
                },
            )
        }
        None => Check::new(
            "capabilities",
            false,
            "cannot read CapEff from /proc/self/status",
        ),
    });
    let root: Option<PathBuf> = match cgroup_root {
        Some(r) => Some(r.to_owned()),
        None => crate::cgroup::find_cgroup2_mount(Path::new("/proc/self/mountinfo")).ok(),
    };
    out.push(match root {
        Some(r) if crate::cgroup::level(&r).is_ok() && r.is_dir() => {
            Check::new("cgroup v2", true, r.display().to_string())
        }
        Some(r) => Check::new(
            "cgroup v2",
            false,
            format!("{} is not a cgroup v2 directory", r.display()),
        ),
        None => Check::new(
            "cgroup v2",
            false,
            "no cgroup2 mount in /proc/self/mountinfo (mount one, or pass --cgroup-root)",
        ),
    });
    out.push(match crate::datapath::check_bpffs(bpffs) {
        Ok(()) => Check::new("bpffs", true, bpffs.display().to_string()),
        Err(e) => Check::new("bpffs", false, crate::chain(&e)),
    });
    let btf = Path::new("/sys/kernel/btf/vmlinux");
    out.push(Check::new(
        "kernel BTF",
        btf.exists(),
        if btf.exists() {
            "/sys/kernel/btf/vmlinux".to_owned()
        } else {
            "/sys/kernel/btf/vmlinux is missing (a kernel built with CONFIG_DEBUG_INFO_BTF)"
                .to_owned()
        },
    ));
    out
}

/// What the mesh needs: the CA (`--mesh-ca`, if given) loads and signs; the capabilities
/// to enter pods' network namespaces; the sysctls the proxy sets in each meshed pod exist.
pub fn mesh(ca: Option<&Path>, host_proc: &Path) -> Vec<Check> {
    let mut out = Vec::new();
    out.push(match ca {
        None => Check::new(
            "mesh CA",
            true,
            "none given (--mesh-ca): meshed pods would get no certificate",
        ),
        Some(dir) => match mesh_ca(dir) {
            Ok(roots) => Check::new(
                "mesh CA",
                true,
                format!("{}: signs; {roots} root(s) trusted", dir.display()),
            ),
            Err(e) => Check::new("mesh CA", false, crate::chain(&e)),
        },
    });
    let caps = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| effective_caps(&s))
        .unwrap_or(0);
    let missing: Vec<&str> = [
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
        (CAP_SYS_PTRACE, "CAP_SYS_PTRACE"),
    ]
    .into_iter()
    .filter(|(bit, _)| caps & (1 << bit) == 0)
    .map(|(_, name)| name)
    .collect();
    out.push(Check::new(
        "mesh: pods' namespaces",
        missing.is_empty(),
        if missing.is_empty() {
            "CAP_SYS_ADMIN (setns) and CAP_SYS_PTRACE (other processes' ns/net)".to_owned()
        } else {
            format!(
                "missing {}: meshed pods get no listeners",
                missing.join(", ")
            )
        },
    ));
    let sysctls = ["tcp_migrate_req", "tcp_fwmark_accept"];
    let absent: Vec<&str> = sysctls
        .into_iter()
        .filter(|n| !host_proc.join("sys/net/ipv4").join(n).exists())
        .collect();
    out.push(Check::new(
        "mesh: sysctls",
        absent.is_empty(),
        if absent.is_empty() {
            format!(
                "net.ipv4.{{{}}} (under {})",
                sysctls.join(","),
                host_proc.display()
            )
        } else {
            format!(
                "net.ipv4.{} missing under {}",
                absent.join(", net.ipv4."),
                host_proc.display()
            )
        },
    ));
    out
}

/// Loads the CA and has it sign a throwaway leaf: the number of roots it trusts.
fn mesh_ca(dir: &Path) -> Result<usize, crate::identity::Error> {
    let ca = crate::identity::ca::Ca::load(dir)?;
    let probe = crate::identity::SpiffeId::new("cluster.local", "weft-doctor", Some("probe"));
    ca.issue(
        &probe,
        std::time::Duration::from_secs(60),
        std::time::SystemTime::now(),
    )?;
    Ok(ca.roots().len())
}

/// Every check, loading each program of the embedded object (nothing is attached or pinned).
pub fn all(bpffs: &Path, cgroup_root: Option<&Path>) -> Vec<Check> {
    let mut out = quick(bpffs, cgroup_root);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    out.push(Check::new("kernel", true, kernel));
    out.extend(
        crate::datapath::load_each_program().into_iter().map(
            |(program, label, result)| match result {
                Ok(()) => Check::new(
                    format!("program {program}"),
                    true,
                    format!("{label}: loads"),
                ),
                Err((error, log)) => Check {
                    name: format!("program {program}"),
                    ok: false,
                    detail: format!("{label}: {error}"),
                    verifier_log: (!log.is_empty()).then_some(log),
                },
            },
        ),
    );
    out
}

/// The checks as a table; failures first line of the verifier log follows each.
pub fn table(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        out.push_str(&format!(
            "{:<4} {:<28} {}\n",
            if c.ok { "ok" } else { "FAIL" },
            c.name,
            c.detail
        ));
        if let Some(log) = &c.verifier_log {
            out.push_str("     verifier log:\n");
            for line in log.lines() {
                out.push_str(&format!("       {line}\n"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_from_proc_status() {
        let root = "Name:\tweft\nCapEff:\t000001ffffffffff\n";
        assert_eq!(
            missing_caps(effective_caps(root).expect("caps")),
            Vec::<&str>::new()
        );
        // BPF, PERFMON and NET_ADMIN only: what the DaemonSet grants.
        let granted = (1u64 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_NET_ADMIN);
        assert!(missing_caps(granted).is_empty());
        assert_eq!(missing_caps(1 << CAP_NET_ADMIN), ["CAP_BPF", "CAP_PERFMON"]);
        assert_eq!(missing_caps(1 << CAP_SYS_ADMIN), ["CAP_NET_ADMIN"]);
        assert_eq!(effective_caps("Name:\tx\n"), None);
    }

    /// The mesh CA check passes for a CA that signs and fails naming the directory for one
    /// that is not there.
    #[test]
    fn the_mesh_ca_check_loads_and_signs() {
        let dir = crate::tests::TempDir::new("doctor-mesh-ca");
        let good = dir.path().join("good");
        crate::identity::ca::Ca::init(&good, std::time::SystemTime::now()).expect("init");
        let check = |ca: &Path| mesh(Some(ca), Path::new("/proc")).remove(0);
        let ok = check(&good);
        assert_eq!(
            (ok.ok, ok.detail),
            (
                true,
                format!("{}: signs; 1 root(s) trusted", good.display())
            )
        );
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).expect("mkdir");
        let bad = check(&empty);
        assert!(!bad.ok);
        assert!(
            bad.detail.starts_with(&empty.display().to_string()),
            "{}",
            bad.detail
        );
    }
}
