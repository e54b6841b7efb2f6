//! Where a Kubernetes pod's cgroup v2 directory is: kubelet names it from the pod's UID and
//! QoS class, differently for its systemd and cgroupfs drivers. The rule is tried first (both
//! drivers); a bounded scan for the UID covers custom `--cgroup-root`s and nested setups
//! (kind runs kubelet under `kubelet.slice`).
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Pod;

/// The kubelet's cgroup driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    Systemd,
    Cgroupfs,
}

/// A pod's QoS class (pod.status.qosClass).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    /// From `status.qosClass`, or computed from the containers' resources as the API server
    /// does when the status does not say.
    pub fn of(pod: &Pod) -> Self {
        match pod.status.as_ref().and_then(|s| s.qos_class.as_deref()) {
            Some("Guaranteed") => return Self::Guaranteed,
            Some("Burstable") => return Self::Burstable,
            Some("BestEffort") => return Self::BestEffort,
            _ => {}
        }
        let Some(spec) = &pod.spec else {
            return Self::BestEffort;
        };
        let containers: Vec<_> = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .collect();
        let any = containers.iter().any(|c| {
            c.resources.as_ref().is_some_and(|r| {
                r.requests.as_ref().is_some_and(|m| !m.is_empty())
                    || r.limits.as_ref().is_some_and(|m| !m.is_empty())
            })
        });
        if !any {
            return Self::BestEffort;
        }
        let guaranteed = containers.iter().all(|c| {
            let Some(r) = &c.resources else { return false };
            let Some(limits) = &r.limits else {
                return false;
            };
            ["cpu", "memory"].iter().all(|res| {
                let limit = limits.get(*res);
                // A request defaults to the limit; if given, it must equal it.
                limit.is_some()
                    && r.requests
                        .as_ref()
                        .and_then(|q| q.get(*res))
                        .is_none_or(|q| Some(q) == limit)
            })
        });
        if guaranteed {
            Self::Guaranteed
        } else {
            Self::Burstable
        }
    }

    const fn name(self) -> &'static str {
        match self {
            Self::Guaranteed => "",
            Self::Burstable => "burstable",
            Self::BestEffort => "besteffort",
        }
    }
}

/// The directory kubelet creates for a pod, relative to the cgroup2 root.
pub fn pod_cgroup(driver: Driver, uid: &str, qos: QosClass) -> PathBuf {
    match driver {
        Driver::Systemd => {
            // systemd unit names cannot hold '-' inside a name part: kubelet escapes it.
            let uid = uid.replace('-', "_");
            match qos {
                QosClass::Guaranteed => {
                    PathBuf::from(format!("kubepods.slice/kubepods-pod{uid}.slice"))
                }
                q => {
                    let class = q.name();
                    PathBuf::from(format!(
                        "kubepods.slice/kubepods-{class}.slice/kubepods-{class}-pod{uid}.slice"
                    ))
                }
            }
        }
        Driver::Cgroupfs => match qos {
            QosClass::Guaranteed => PathBuf::from(format!("kubepods/pod{uid}")),
            q => PathBuf::from(format!("kubepods/{}/pod{uid}", q.name())),
        },
    }
}

/// Scans at most this deep below the root for a pod's directory.
const SCAN_DEPTH: usize = 6;

/// The pod's cgroup directory under `root` (the cgroup2 mount): the kubelet's rule for either
/// driver, else a scan for a directory named after the UID. None: it does not exist (yet);
/// callers retry on their next pass.
pub fn find_pod_cgroup(root: &Path, uid: &str, qos: QosClass) -> Option<PathBuf> {
    for driver in [Driver::Systemd, Driver::Cgroupfs] {
        let dir = root.join(pod_cgroup(driver, uid, qos));
        if dir.is_dir() {
            return Some(dir);
        }
    }
    let names = [format!("pod{uid}"), format!("pod{}", uid.replace('-', "_"))];
    scan(root, &names, SCAN_DEPTH)
}

fn scan(dir: &Path, names: &[String], depth: usize) -> Option<PathBuf> {
    if depth == 0 {
        return None;
    }
    let mut subdirs = Vec::new();
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let stem = name.strip_suffix(".slice").unwrap_or(&name);
        if names
            .iter()
            .any(|n| stem == n || stem.ends_with(&format!("-{n}")))
        {
            return Some(entry.path());
        }
        subdirs.push(entry.path());
    }
    subdirs.sort();
    subdirs.into_iter().find_map(|d| scan(&d, names, depth - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0b1c2d3e-aaaa-bbbb-cccc-123456789abc";

    #[test]
    fn kubelet_names_for_each_driver_and_qos_class() {
        let cases = [
            (
                Driver::Systemd,
                QosClass::Guaranteed,
                "kubepods.slice/kubepods-pod0b1c2d3e_aaaa_bbbb_cccc_123456789abc.slice",
            ),
            (
                Driver::Systemd,
                QosClass::Burstable,
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0b1c2d3e_aaaa_bbbb_cccc_123456789abc.slice",
            ),
            (
                Driver::Systemd,
                QosClass::BestEffort,
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0b1c2d3e_aaaa_bbbb_cccc_123456789abc.slice",
            ),
            (
                Driver::Cgroupfs,
                QosClass::Guaranteed,
                "kubepods/pod0b1c2d3e-aaaa-bbbb-cccc-123456789abc",
            ),
            (
                Driver::Cgroupfs,
                QosClass::Burstable,
                "kubepods/burstable/pod0b1c2d3e-aaaa-bbbb-cccc-123456789abc",
            ),
            (
                Driver::Cgroupfs,
                QosClass::BestEffort,
                "kubepods/besteffort/pod0b1c2d3e-aaaa-bbbb-cccc-123456789abc",
            ),
        ];
        for (driver, qos, want) in cases {
            assert_eq!(
                pod_cgroup(driver, UID, qos),
                PathBuf::from(want),
                "{driver:?} {qos:?}"
            );
        }
    }

    /// A directory tree removed on drop (also when the test panics).
    struct Tree(PathBuf);

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tree(name: &str, dirs: &[&str]) -> Tree {
        let root =
            std::env::temp_dir().join(format!("weft-cgroup-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for d in dirs {
            std::fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        Tree(root)
    }

    #[test]
    fn finds_the_rule_for_either_driver_then_scans() {
        for driver in [Driver::Systemd, Driver::Cgroupfs] {
            for qos in [
                QosClass::Guaranteed,
                QosClass::Burstable,
                QosClass::BestEffort,
            ] {
                let rel = pod_cgroup(driver, UID, qos);
                let t = tree(
                    &format!("{driver:?}-{qos:?}"),
                    &[rel.to_str().expect("utf-8"), "system.slice"],
                );
                assert_eq!(find_pod_cgroup(&t.0, UID, qos), Some(t.0.join(&rel)));
            }
        }
        // kind: kubelet's tree under kubelet.slice, and a QoS class the status got wrong.
        let nested = "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod0b1c2d3e_aaaa_bbbb_cccc_123456789abc.slice";
        let t = tree("kind", &[nested, "kubelet.slice/other"]);
        assert_eq!(
            find_pod_cgroup(&t.0, UID, QosClass::Burstable),
            Some(t.0.join(nested))
        );
        assert_eq!(
            find_pod_cgroup(&t.0, "not-there", QosClass::Burstable),
            None
        );
    }

    #[test]
    fn qos_class_from_status_or_resources() {
        let pod = |yaml: &str| -> Pod { serde_saphyr::from_str(yaml).expect("pod") };
        assert_eq!(
            QosClass::of(&pod("metadata: {name: a}\nstatus: {qosClass: Burstable}")),
            QosClass::Burstable
        );
        assert_eq!(
            QosClass::of(&pod("metadata: {name: a}\nspec: {containers: [{name: c}]}")),
            QosClass::BestEffort
        );
        assert_eq!(
            QosClass::of(&pod(
                "metadata: {name: a}\nspec: {containers: [{name: c, resources: {limits: {cpu: '1', memory: 1Gi}}}]}"
            )),
            QosClass::Guaranteed
        );
        assert_eq!(
            QosClass::of(&pod(
                "metadata: {name: a}\nspec: {containers: [{name: c, resources: {requests: {cpu: 100m}, limits: {cpu: '1', memory: 1Gi}}}]}"
            )),
            QosClass::Burstable
        );
    }
}
