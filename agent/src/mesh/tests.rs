use std::path::{Path, PathBuf};

use super::*;
use crate::compile::policy::tests::model::store_of;

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("weft-mesh-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("create");
        Self(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn t0() -> SystemTime {
    SystemTime::now()
}

fn settings(ca: Option<&Path>) -> Settings {
    Settings {
        mesh_ca: ca.map(Path::to_owned),
        trust_domain: "cluster.local".into(),
        mesh_cert_ttl: Duration::from_secs(20),
        drain_timeout: Duration::from_secs(30),
        mesh_tunnel_idle_timeout: Duration::from_secs(300),
        host_proc: PathBuf::from("/proc"),
    }
}

fn store() -> Store {
    store_of(&[
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {weft.io/mesh: enabled}}\n",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: plain}\n",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: odd, labels: {weft.io/mesh: maybe}}\n",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop}\nspec: {serviceAccountName: web, containers: []}\n",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web-2, namespace: shop}\nspec: {serviceAccountName: web, containers: []}\n",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: db, namespace: shop}\nspec: {serviceAccountName: db, containers: []}\n",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: job, namespace: plain}\n",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: cron, namespace: odd}\n",
    ])
}

fn local<'a>(pods: &[&'a str]) -> Vec<LocalPod<'a>> {
    pods.iter()
        .map(|pod| LocalPod {
            pod,
            ips: &[],
            cgroup: PathBuf::from("/nonexistent"),
            cgroup_id: None,
        })
        .collect()
}

fn status(mesh: &Mesh) -> MeshStatus {
    mesh.status().read().expect("lock").clone()
}

/// Only identities of this node's meshed pods get a certificate; a pod of another node or
/// outside the mesh gets none.
#[test]
fn certificates_are_held_for_the_local_meshed_pods_only() {
    let d = Dir::new("local");
    Ca::init(&d.0, t0()).expect("init");
    let mut mesh = Mesh::new(&settings(Some(&d.0)), &mut Registry::default(), None, None);
    mesh.on_pass(
        &store(),
        &local(&["shop/web", "shop/web-2", "plain/job", "odd/cron"]),
        t0(),
    );
    let s = status(&mesh);
    let ids: Vec<(&str, Vec<&str>, bool)> = s
        .identities
        .iter()
        .map(|i| {
            let pods = i.pods.iter().map(String::as_str).collect();
            (i.identity.as_str(), pods, i.certificate.is_some())
        })
        .collect();
    assert_eq!(
        ids,
        [
            // A label value weft does not understand meshes (and is reported).
            (
                "spiffe://cluster.local/ns/odd/sa/default",
                vec!["odd/cron"],
                true
            ),
            (
                "spiffe://cluster.local/ns/shop/sa/web",
                vec!["shop/web", "shop/web-2"],
                true
            )
        ]
    );
    assert_eq!(s.ca.as_ref().map(|c| c.roots.len()), Some(1));
    assert_eq!(s.unknown_labels, ["Namespace odd: weft.io/mesh=\"maybe\""]);
    assert!(s.degraded().is_empty(), "{:?}", s.degraded());
    mesh.on_pass(&store(), &local(&["shop/db"]), t0());
    let s = status(&mesh);
    assert_eq!(s.identities.len(), 1);
    assert_eq!(
        s.identities[0].identity,
        "spiffe://cluster.local/ns/shop/sa/db"
    );
}

/// Meshed pods without a CA are reported (status, readiness), not silently plaintext.
#[test]
fn meshed_pods_without_a_ca_are_reported() {
    let mut mesh = Mesh::new(&settings(None), &mut Registry::default(), None, None);
    mesh.on_pass(&store(), &local(&["shop/db"]), t0());
    let s = status(&mesh);
    assert!(s.identities[0].certificate.is_none());
    assert_eq!(
        s.degraded(),
        [
            "meshed pods without a valid certificate: spiffe://cluster.local/ns/shop/sa/db (no mesh CA: the agent runs without --mesh-ca)"
        ]
    );
    assert_eq!(mesh.next_due(), None, "nothing to retry without a CA");
}

/// A CA that cannot be read at start is reported; once readable, the pods get their
/// certificates at the next read. A CA replaced on disk renews every certificate; a broken
/// replacement keeps the CA in use.
#[test]
fn the_ca_is_taken_up_when_it_appears_changes_or_breaks() {
    let d = Dir::new("reload");
    let mut mesh = Mesh::new(&settings(Some(&d.0)), &mut Registry::default(), None, None);
    mesh.on_pass(&store(), &local(&["shop/db"]), t0());
    let s = status(&mesh);
    let ca = s.ca.as_ref().expect("ca");
    assert!(!ca.loaded);
    assert!(
        ca.error
            .as_deref()
            .is_some_and(|e| e.contains("neither ca.crt")),
        "{ca:?}"
    );
    assert_eq!(s.degraded().len(), 2, "{:?}", s.degraded());

    Ca::init(&d.0, t0()).expect("init");
    mesh.reload_ca(t0());
    let first = status(&mesh).identities[0]
        .certificate
        .clone()
        .expect("issued");
    assert!(status(&mesh).degraded().is_empty());
    mesh.reload_ca(t0());
    let same = status(&mesh).identities[0]
        .certificate
        .clone()
        .expect("held");
    assert_eq!(same.serial, first.serial, "an unchanged CA renews nothing");

    std::fs::remove_file(d.0.join("ca.crt")).expect("rm");
    std::fs::remove_file(d.0.join("ca.key")).expect("rm");
    Ca::init(&d.0, t0()).expect("init again");
    mesh.reload_ca(t0());
    let renewed = status(&mesh).identities[0]
        .certificate
        .clone()
        .expect("held");
    assert_ne!(renewed.serial, first.serial, "a new CA renews");

    std::fs::write(d.0.join("ca.key"), "garbage").expect("write");
    mesh.reload_ca(t0());
    let s = status(&mesh);
    let ca = s.ca.as_ref().expect("ca");
    assert!(ca.loaded && ca.error.is_some(), "{ca:?}");
    assert_eq!(
        s.identities[0].certificate.as_ref().map(|c| &c.serial),
        Some(&renewed.serial)
    );
    assert_eq!(s.degraded().len(), 1, "{:?}", s.degraded());
}
