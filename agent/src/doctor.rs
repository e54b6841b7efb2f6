//! What the agent needs from the node, checked one by one: `weft doctor` prints every check
//! (and the verifier log of any program that does not load); `weft agent` runs the quick ones
//! first and refuses to start naming what is missing.
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::mesh::MeshStatus;

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

/// How long doctor waits for a running agent's answer: a wedged agent must not hang it.
pub const ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// The running agent's `/mesh/certs` from `socket`; `None` when no answer came within
/// [`ANSWER_WITHIN`].
pub async fn ask_running(socket: &Path) -> Option<Result<MeshStatus, crate::admin::Error>> {
    let asked = crate::admin::get_json(socket, "/mesh/certs");
    tokio::time::timeout(ANSWER_WITHIN, asked).await.ok()
}

/// What the running agent says of the mesh (see [`ask_running`]): the CA it uses, a valid
/// certificate for each identity of its meshed pods (at `now`) and no failed renewal, the
/// proxy listening for each of them, and the `weft.io/mesh` values it ignored. When there
/// is no agent (no socket: before the agent's first start, say), the checks above are all
/// there is, which is not a failure; a socket nobody answers on is.
pub fn running_mesh(
    socket: &Path,
    answer: Option<Result<MeshStatus, crate::admin::Error>>,
    now: std::time::SystemTime,
) -> Vec<Check> {
    let name = "running agent";
    let status = match answer {
        Some(Ok(status)) => status,
        Some(Err(crate::admin::Error::Connect { path, source }))
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            let detail = format!(
                "none ({} does not exist): the checks above are pre-flight only",
                path.display()
            );
            return vec![Check::new(name, true, detail)];
        }
        Some(Err(e)) => return vec![Check::new(name, false, crate::chain(&e))],
        None => {
            let detail = format!(
                "no answer on {} within {} s",
                socket.display(),
                ANSWER_WITHIN.as_secs()
            );
            return vec![Check::new(name, false, detail)];
        }
    };
    let now = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    vec![
        running_ca(&status),
        running_certificates(&status, now),
        running_renewals(&status, now),
        running_listeners(&status),
        listed(
            "agent: mesh labels",
            &status.unknown_labels,
            "every weft.io/mesh value is enabled or disabled".to_owned(),
            "ignored (neither enabled nor disabled):",
        ),
    ]
}

/// A certificate valid at `now` (seconds since the epoch).
fn valid(i: &crate::mesh::status::IdentityStatus, now: u64) -> bool {
    i.certificate
        .as_ref()
        .is_some_and(|c| c.not_after_unix > now)
}

fn running_ca(status: &MeshStatus) -> Check {
    let name = "agent: mesh CA";
    let Some(ca) = &status.ca else {
        let needed = status.identities.len();
        return Check::new(
            name,
            needed == 0,
            format!(
                "none (no --mesh-ca); identities of meshed pods needing a certificate: {needed}"
            ),
        );
    };
    let dir = ca.dir.display();
    match (ca.loaded, &ca.error) {
        (true, None) => Check::new(
            name,
            true,
            format!("{dir}: loaded, {} root(s) trusted", ca.roots.len()),
        ),
        (true, Some(e)) => Check::new(
            name,
            false,
            format!("{dir}: an earlier read is in use; the last read failed: {e}"),
        ),
        (false, e) => Check::new(
            name,
            false,
            format!(
                "{dir}: not loaded: {}",
                e.as_deref().unwrap_or("not read yet")
            ),
        ),
    }
}

fn running_certificates(status: &MeshStatus, now: u64) -> Check {
    let lacking: Vec<String> = status
        .identities
        .iter()
        .filter(|i| !valid(i, now))
        .map(|i| {
            let why = match (&i.certificate, &i.error) {
                (_, Some(e)) => e.clone(),
                (Some(c), None) => format!("expired {}", c.not_after),
                (None, None) => "none issued yet".to_owned(),
            };
            format!("{} ({why})", i.identity)
        })
        .collect();
    let fine = format!(
        "{} identities of meshed pods, each with a valid certificate",
        status.identities.len()
    );
    listed(
        "agent: certificates",
        &lacking,
        fine,
        "no valid certificate for",
    )
}

/// Identities whose certificate is still valid but could not be renewed.
fn running_renewals(status: &MeshStatus, now: u64) -> Check {
    let failed: Vec<String> = status
        .identities
        .iter()
        .filter(|i| valid(i, now))
        .filter_map(|i| {
            let e = i.error.as_ref()?;
            let until = i.certificate.as_ref().map_or("", |c| c.not_after.as_str());
            Some(format!(
                "{} ({e}; its certificate is valid until {until})",
                i.identity
            ))
        })
        .collect();
    let fine = "no renewal failed".to_owned();
    listed("agent: renewals", &failed, fine, "renewal failed for")
}

/// Check `name`: passes with `fine` when nothing is `wrong`, else fails listing it.
fn listed(name: &str, wrong: &[String], fine: String, listing: &str) -> Check {
    if wrong.is_empty() {
        Check::new(name, true, fine)
    } else {
        Check::new(name, false, format!("{listing} {}", wrong.join(", ")))
    }
}

fn running_listeners(status: &MeshStatus) -> Check {
    let silent: Vec<String> = status
        .pods
        .iter()
        .filter(|p| p.listeners.is_empty() || p.error.is_some())
        .map(|p| {
            format!(
                "{} ({})",
                p.pod,
                p.error.as_deref().unwrap_or("no listener yet")
            )
        })
        .collect();
    let fine = format!(
        "{} meshed pods, the proxy listening for each",
        status.pods.len()
    );
    listed("agent: listeners", &silent, fine, "not listening for")
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

    /// When the tests look: a day before the certificates' expiry.
    const NOW: u64 = 1_796_515_200;
    const ID: &str = "spiffe://cluster.local/ns/shop/sa/web";

    fn at(secs: u64) -> std::time::SystemTime {
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs)
    }

    /// A running agent's mesh on a node with two meshed pods of one identity: its
    /// certificate expiring at `not_after` (none for `None`), the identity's `error`, and
    /// the proxy listening for both pods or only the first.
    fn running(not_after: Option<u64>, error: Option<&str>, listening: bool) -> MeshStatus {
        use crate::mesh::status::{CaStatus, CertStatus, IdentityStatus, PodStatus};
        let pods = ["shop/web-1", "shop/web-2"];
        MeshStatus {
            trust_domain: "cluster.local".into(),
            ca: Some(CaStatus {
                dir: "/etc/weft/ca".into(),
                loaded: true,
                ..CaStatus::default()
            }),
            identities: vec![IdentityStatus {
                identity: ID.into(),
                pods: pods.map(str::to_owned).to_vec(),
                certificate: not_after.map(|unix| CertStatus {
                    serial: "01".into(),
                    not_before: "earlier".into(),
                    not_after: format!("T{unix}"),
                    not_after_unix: unix,
                    renew_at: "later".into(),
                    expired: false,
                }),
                error: error.map(str::to_owned),
            }],
            pods: pods
                .iter()
                .enumerate()
                .map(|(i, pod)| PodStatus {
                    pod: (*pod).to_owned(),
                    listeners: if listening || i == 0 {
                        vec!["127.0.0.1:15001".into()]
                    } else {
                        Vec::new()
                    },
                    error: None,
                })
                .collect(),
            ..MeshStatus::default()
        }
    }

    fn checked(status: MeshStatus) -> Vec<Check> {
        running_mesh(Path::new("/run/weft/node.sock"), Some(Ok(status)), at(NOW))
    }

    fn summary(checks: &[Check]) -> Vec<(&str, bool, &str)> {
        checks
            .iter()
            .map(|c| (c.name.as_str(), c.ok, c.detail.as_str()))
            .collect()
    }

    /// A running agent whose meshed pods all have a valid certificate and a listener passes
    /// every mesh check.
    #[test]
    fn a_running_agent_serving_every_meshed_pod_passes() {
        let checks = checked(running(Some(NOW + 86_400), None, true));
        assert_eq!(
            summary(&checks),
            [
                (
                    "agent: mesh CA",
                    true,
                    "/etc/weft/ca: loaded, 0 root(s) trusted"
                ),
                (
                    "agent: certificates",
                    true,
                    "1 identities of meshed pods, each with a valid certificate"
                ),
                ("agent: renewals", true, "no renewal failed"),
                (
                    "agent: listeners",
                    true,
                    "2 meshed pods, the proxy listening for each"
                ),
                (
                    "agent: mesh labels",
                    true,
                    "every weft.io/mesh value is enabled or disabled"
                ),
            ]
        );
    }

    /// An identity without a certificate valid now (none yet, none for a reason, or one
    /// expired since the agent last looked) fails, named with why.
    #[test]
    fn an_identity_without_a_valid_certificate_fails_naming_it() {
        for (not_after, error, why) in [
            (None, None, "none issued yet".to_owned()),
            (None, Some("no mesh CA"), "no mesh CA".to_owned()),
            (Some(NOW), None, format!("expired T{NOW}")),
        ] {
            let checks = checked(running(not_after, error, true));
            let want = format!("no valid certificate for {ID} ({why})");
            assert_eq!(
                summary(&checks)[1],
                ("agent: certificates", false, want.as_str())
            );
        }
    }

    /// A certificate still valid whose renewal failed is no missing certificate: the
    /// renewal check fails instead, saying until when the certificate holds.
    #[test]
    fn a_failed_renewal_of_a_valid_certificate_is_its_own_failure() {
        let checks = checked(running(Some(NOW + 60), Some("the CA cannot be read"), true));
        let want = format!(
            "renewal failed for {ID} (the CA cannot be read; its certificate is valid until T{})",
            NOW + 60
        );
        assert_eq!(
            summary(&checks)[1..3],
            [
                (
                    "agent: certificates",
                    true,
                    "1 identities of meshed pods, each with a valid certificate"
                ),
                ("agent: renewals", false, want.as_str()),
            ]
        );
    }

    /// A meshed pod the proxy does not listen for fails, named.
    #[test]
    fn a_pod_without_a_listener_fails_naming_it() {
        let checks = checked(running(Some(NOW + 86_400), None, false));
        assert_eq!(
            summary(&checks)[3],
            (
                "agent: listeners",
                false,
                "not listening for shop/web-2 (no listener yet)"
            )
        );
    }

    /// No agent (no socket) is no failure: a node before its agent's first start. A socket
    /// nobody answers on, an agent that answers wrongly or not in time is.
    #[test]
    fn only_a_missing_socket_leaves_the_pre_flight_checks_alone() {
        let socket = Path::new("/run/weft/node.sock");
        let connect = |kind: std::io::ErrorKind| crate::admin::Error::Connect {
            path: socket.to_owned(),
            source: kind.into(),
        };
        let cases = [
            (
                Some(Err(connect(std::io::ErrorKind::NotFound))),
                true,
                "none (/run/weft/node.sock does not exist): the checks above are pre-flight only",
            ),
            (
                Some(Err(connect(std::io::ErrorKind::ConnectionRefused))),
                false,
                "no weft agent answers on /run/weft/node.sock (is it running, and is --instance right?): connection refused",
            ),
            (
                Some(Err(crate::admin::Error::Status {
                    status: 500,
                    body: "broken".into(),
                })),
                false,
                "the agent answered 500: broken",
            ),
            (None, false, "no answer on /run/weft/node.sock within 5 s"),
        ];
        for (answer, ok, detail) in cases {
            let checks = running_mesh(socket, answer, at(NOW));
            assert_eq!(summary(&checks), [("running agent", ok, detail)]);
        }
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
