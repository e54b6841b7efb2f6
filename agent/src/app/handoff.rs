//! Handing the instance from one agent to the next without failing a meshed connection.
//!
//! The successor (`--take-over`) announces itself with the successor lock and waits for the
//! instance lock. The running agent, seeing the successor lock held, stops everything but
//! its mesh proxy and releases the instance: the datapath, pinned, never stops. The
//! successor adopts it, listens beside the old listeners (SO_REUSEPORT) and releases the
//! successor lock; only then does the old agent close its listeners (connections still in
//! their queues move to the successor's, `tcp_migrate_req`) and drain what it carries.
use std::time::{Duration, Instant};

use super::{Error, Signals};
use crate::{
    datapath::{self, InstanceLock, Pins, SuccessorLock},
    mesh::Mesh,
};

/// How often the lock a successor waits on is tried.
const LOCK_POLL: Duration = Duration::from_millis(50);
/// How often an agent that handed over looks whether its successor still runs.
const ORPHAN_CHECK: Duration = Duration::from_secs(1);

/// What [`acquire`] got.
pub(super) struct Acquired {
    pub lock: InstanceLock,
    /// The successor lock when this agent got it (held until it listens).
    pub successor: Option<SuccessorLock>,
    /// Another agent ran the instance and handed it over.
    pub took_over: bool,
}

/// The instance lock, at once; with `--take-over` and another agent running, once it handed
/// over. None: a signal came while waiting.
pub(super) async fn acquire(
    instance: &datapath::Instance,
    take_over: bool,
    signals: &mut Signals,
) -> Result<Option<Acquired>, Error> {
    let pins = datapath::instance_pins(instance)?;
    // Every agent holds the successor lock until it listens: an agent that handed over and
    // waits for it to let go tells a successor that listens from one that exited.
    match pins.lock() {
        Ok(lock) => {
            return Ok(Some(Acquired {
                lock,
                successor: pins.try_announce_successor()?,
                took_over: false,
            }));
        }
        Err(datapath::Error::InstanceBusy { .. }) if take_over => {}
        Err(e) => return Err(e.into()),
    }
    tracing::info!(
        instance = instance.name,
        "another agent runs the instance: waiting for it to hand over"
    );
    // The successor lock first (another agent holds it while it starts, or another
    // successor waits before this one), then the instance.
    let mut successor = None;
    loop {
        if successor.is_none() {
            successor = pins.try_announce_successor()?;
        }
        if successor.is_some() {
            match pins.lock() {
                Ok(lock) => {
                    return Ok(Some(Acquired {
                        lock,
                        successor,
                        took_over: true,
                    }));
                }
                Err(datapath::Error::InstanceBusy { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        tokio::select! {
            () = signals.recv() => return Ok(None),
            () = tokio::time::sleep(LOCK_POLL) => {}
        }
    }
}

/// Waits while a successor holds its lock (it has not listened yet), taking a SIGTERM as
/// the start of the drain (a second one as its end); returns at the deadline too.
async fn wait_for_listeners(
    pins: &Pins,
    signals: &mut Signals,
    deadline: &mut Option<Instant>,
    drain_timeout: Duration,
) {
    while pins.successor_waiting() && deadline.is_none_or(|d| Instant::now() < d) {
        tokio::select! {
            () = signals.recv() => {
                // A second signal ends the wait, and the drain, now.
                let now = Instant::now();
                *deadline = Some(deadline.map_or(now + drain_timeout, |_| now));
            }
            () = tokio::time::sleep(LOCK_POLL) => {}
        }
    }
}

/// Nobody runs the instance: no agent holds it, no successor waits for it (the successor
/// exited). The lock taken to look is released at once.
fn orphaned(pins: &Pins) -> bool {
    !pins.successor_waiting() && pins.lock().is_ok()
}

/// After the instance was released to a successor: keeps the mesh listeners until the
/// successor's are up (or `deadline`), closes them, and drains. Returns once drained and
/// SIGTERM came (`deadline` is set from the first SIGTERM), or at the deadline. Fails when
/// the successor exited and nobody runs the instance: the agent exits then, for a restart
/// (the kubelet's) to take it.
pub(super) async fn drain(
    mut mesh: Mesh,
    pins: &Pins,
    signals: &mut Signals,
    mut deadline: Option<Instant>,
) -> Result<(), Error> {
    let drain_timeout = mesh.drain_timeout();
    tracing::info!("the instance is the successor's; the mesh listeners stay until its listen");
    wait_for_listeners(pins, signals, &mut deadline, drain_timeout).await;
    if orphaned(pins) {
        return Err(Error::SuccessorGone);
    }
    mesh.stop_accepting();
    let active = mesh.active();
    tracing::info!(
        connections = active,
        "mesh listeners closed; draining the connections in progress"
    );
    let drained = mesh.drained();
    let mut drained = std::pin::pin!(drained);
    let mut done = false;
    let mut look = tokio::time::interval(ORPHAN_CHECK);
    loop {
        tokio::select! {
            () = &mut drained, if !done => {
                done = true;
                if deadline.is_some() {
                    return Ok(());
                }
                tracing::info!("drained; waiting for SIGTERM");
            }
            () = signals.recv() => {
                if deadline.is_some() || done {
                    return Ok(());
                }
                deadline = Some(Instant::now() + drain_timeout);
            }
            () = super::sleep_until(deadline), if deadline.is_some() => {
                tracing::warn!(
                    connections_at_handover = active,
                    "drain timeout: the meshed connections still open are cut"
                );
                return Ok(());
            }
            _ = look.tick(), if deadline.is_none() => {
                if orphaned(pins) {
                    return Err(Error::SuccessorGone);
                }
            }
        }
    }
}
