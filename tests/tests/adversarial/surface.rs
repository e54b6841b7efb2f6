//! 9. The agent's own surface: the admin socket is for the node's administrators, and
//!    metrics can require a token.
use std::{os::unix::fs::PermissionsExt as _, process::Command};

use weft_testkit::{Agent, Node, agent::weft_binary, prom};

/// `weft status` against the agent's socket as another user and group (setpriv).
fn status_as(agent: &Agent, uid: u32, gid: u32) -> std::process::Output {
    Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            "--clear-groups",
        ])
        .arg(weft_binary())
        .arg("status")
        .arg("--admin-socket")
        .arg(agent.admin_socket())
        .output()
        .expect("setpriv")
}

#[test]
fn the_admin_socket_is_for_root_only() {
    let node = Node::builder("adv_admin_mode").pod("a").build();
    let agent = Agent::with_source(&node, &[]);
    let mode = std::fs::metadata(agent.admin_socket())
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // The socket's directory must let another user reach it for the test to mean anything.
    let dir = agent.admin_socket().parent().expect("dir").to_owned();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = status_as(&agent, 65534, 65534);
    assert!(
        !out.status.success(),
        "another user used the admin API: {out:?}"
    );
}

#[test]
fn an_admin_group_opens_the_socket_to_its_members_only() {
    let node = Node::builder("adv_admin_group").pod("a").build();
    let agent = Agent::with_source(&node, &["--admin-group", "4242"]);
    let meta = std::fs::metadata(agent.admin_socket()).expect("socket");
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    let dir = agent.admin_socket().parent().expect("dir").to_owned();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let member = status_as(&agent, 65534, 4242);
    assert!(member.status.success(), "a member was refused: {member:?}");
    let stranger = status_as(&agent, 65534, 65534);
    assert!(
        !stranger.status.success(),
        "a stranger used the admin API: {stranger:?}"
    );
}

#[test]
fn metrics_can_require_a_bearer_token() {
    let node = Node::builder("adv_metrics_token").pod("a").build();
    let token_file = node.workdir().join("token");
    std::fs::write(&token_file, "s3cret-token\n").expect("token");
    let file = token_file.to_string_lossy().into_owned();
    let agent = Agent::with_source(&node, &["--metrics-token-file", &file]);
    let addr = agent.metrics_addr();
    assert_eq!(prom::get(addr, "/metrics", None).status, 401);
    let wrong = prom::get_with(addr, "/metrics", &[("Authorization", "Bearer nope")]);
    assert_eq!(wrong.status, 401);
    let right = prom::get_with(
        addr,
        "/metrics",
        &[("Authorization", "Bearer s3cret-token")],
    );
    assert_eq!(right.status, 200);
    assert!(right.body.contains("weft_build_info"), "{}", right.body);
    assert_eq!(
        prom::get(addr, "/readyz", None).status,
        200,
        "probes stay open"
    );
}
