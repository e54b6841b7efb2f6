//! Traffic between pods with `weft-pod`, for tests, the demo and benchmarks.
use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use serde_json::Value;

use crate::{node::Node, proc::Process};

const WAIT: Duration = Duration::from_secs(20);

/// How the client ends a [`Node::tcp_exchange`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// shutdown(SHUT_WR) after sending, read to EOF, close: the server's FIN arrives while the
    /// client's socket is in FIN_WAIT2.
    Shutdown,
    /// Read exactly the reply, then close() at once: the client's socket is orphaned before
    /// the server's FIN arrives.
    Close,
}

impl Close {
    const fn arg(self) -> &'static str {
        match self {
            Self::Shutdown => "shutdown",
            Self::Close => "close",
        }
    }
}

/// The two ends of a finished exchange, as `ip:port` strings (as the agent reports them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    pub client: String,
    pub server: String,
}

impl Process {
    /// Waits for a `weft-pod probe` to finish: its results, by target (the name the server
    /// answered, or `error: ...`).
    pub fn probe_results(&mut self) -> Value {
        self.wait_success(Duration::from_secs(30));
        let v: Value = self
            .stdout()
            .wait_for("probe results", Duration::from_secs(5), |lines| {
                lines.iter().find_map(|l| {
                    serde_json::from_str::<Value>(l)
                        .ok()
                        .filter(|v| v["event"] == "probe")
                })
            });
        v["results"].clone()
    }

    /// Waits for a `weft-pod` server's `listening` line.
    pub fn wait_listening(&self) {
        self.stdout()
            .wait_for("the server to listen", WAIT, |lines| {
                lines
                    .iter()
                    .any(|l| l.contains("\"listening\""))
                    .then_some(())
            });
    }
}

/// What [`Node::spray_listing_failures`] saw.
#[derive(Debug)]
pub struct Spray {
    /// Connections per backend name.
    pub counts: BTreeMap<String, u64>,
    /// Failed connections.
    pub errors: u64,
    /// The first 1000 failures.
    pub failures: Vec<SprayFailure>,
}

/// A failed connection of a [`Spray`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct SprayFailure {
    /// The call that failed: connect, getpeername, shutdown or read.
    pub call: String,
    /// Its errno's name (ECONNREFUSED, ETIMEDOUT, ...) or the error's text.
    pub error: String,
    /// From the start of the connect to the failure.
    pub ms: u64,
}

impl Node {
    /// `count` TCP connections from `pod` to `target` (a ClusterIP and port, each backend
    /// replying with its name): connections per backend. Panics unless every connection
    /// succeeds and getpeername() returns the target.
    pub fn spray(&self, pod: &str, target: &str, count: u64) -> BTreeMap<String, u64> {
        let (counts, errors) = self.spray_counting_errors(pod, target, count);
        assert_eq!(errors, 0, "every connection succeeds: {counts:?}");
        counts
    }

    /// As [`Node::spray`], where connections may fail: (connections per backend, failed
    /// connections). Panics unless getpeername() returns the target.
    pub fn spray_counting_errors(
        &self,
        pod: &str,
        target: &str,
        count: u64,
    ) -> (BTreeMap<String, u64>, u64) {
        let spray = self.spray_listing_failures(pod, target, count);
        (spray.counts, spray.errors)
    }

    /// As [`Node::spray_counting_errors`], with the first 1000 failures listed in order.
    pub fn spray_listing_failures(&self, pod: &str, target: &str, count: u64) -> Spray {
        let mut p = self.spawn(
            pod,
            &[
                "tcp-spray",
                "--connect",
                target,
                "--count",
                &count.to_string(),
            ],
        );
        p.wait_success(Duration::from_secs(120));
        let v: Value = p.stdout().wait_for("spray result", WAIT, |lines| {
            lines.iter().find_map(|l| {
                serde_json::from_str::<Value>(l)
                    .ok()
                    .filter(|v| v["event"] == "spray")
            })
        });
        assert_eq!(
            v["peer_mismatches"], 0,
            "getpeername() returns the ClusterIP: {v}"
        );
        Spray {
            counts: serde_json::from_value(v["counts"].clone()).expect("counts"),
            errors: v["errors"].as_u64().expect("errors"),
            failures: serde_json::from_value(v["failures"].clone()).expect("failures"),
        }
    }

    /// Starts a `weft-pod` server in `pod` and waits until it listens.
    pub fn start_server(&self, pod: &str, args: &[&str]) -> Process {
        let p = self.spawn(pod, args);
        p.wait_listening();
        p
    }

    /// One TCP connection from `client_pod` to a one-shot server in `server_pod` at `server`:
    /// the client sends `send` bytes, the server replies `reply` bytes. Panics unless both
    /// sides moved exactly that.
    pub fn tcp_exchange(
        &self,
        client_pod: &str,
        server_pod: &str,
        server: SocketAddr,
        send: u64,
        reply: u64,
        close: Close,
    ) -> Exchange {
        let (addr, send_s, reply_s) = (server.to_string(), send.to_string(), reply.to_string());
        let mut args = vec![
            "tcp-server",
            "--listen",
            &addr,
            "--reply",
            &reply_s,
            "--connections",
            "1",
        ];
        if close == Close::Close {
            // The client never shuts down its side: the server reads exactly what it sends.
            args.extend(["--read", &send_s]);
        }
        let _server = self.start_server(server_pod, &args);
        let mut client = self.spawn(
            client_pod,
            &[
                "tcp-client",
                "--connect",
                &addr,
                "--send",
                &send_s,
                "--expect",
                &reply_s,
                "--close",
                close.arg(),
            ],
        );
        client.wait_success(WAIT);
        let done: Value = client
            .stdout()
            .wait_for("the client's result", WAIT, |lines| {
                lines.iter().find_map(|l| {
                    serde_json::from_str::<Value>(l)
                        .ok()
                        .filter(|v| v["event"] == "done")
                })
            });
        assert_eq!(done["sent"], send, "the client sent what it was asked to");
        assert_eq!(
            done["received"], reply,
            "the client received what the server sent"
        );
        Exchange {
            client: done["local"].as_str().unwrap_or_default().to_owned(),
            server: done["remote"].as_str().unwrap_or_default().to_owned(),
        }
    }
}
