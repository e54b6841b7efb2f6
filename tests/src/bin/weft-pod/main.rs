//! `weft-pod`: the workload that tests, the demo and benchmarks run inside simulated pods.
//! Every subcommand prints JSON lines on stdout; the first line of a server says where it
//! listens, so callers know when it is ready.
use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::ExitCode,
    thread,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;

mod raw;

#[derive(Debug, Parser)]
#[command(name = "weft-pod", about = "Test workload for weft's simulated pods")]
struct Cli {
    /// Run on this CPU only (sched_setaffinity, before anything else): benchmarks place
    /// clients and servers on fixed CPUs so every variant runs with the same placement.
    #[arg(long)]
    cpu: Option<usize>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CloseMode {
    /// shutdown(SHUT_WR) after sending, read to EOF, then close.
    Shutdown,
    /// Read exactly --expect bytes, then close() at once.
    Close,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Accept TCP connections; read each to EOF (or exactly --read bytes), send --reply bytes,
    /// wait for the peer to close, and close.
    TcpServer {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value_t = 0)]
        reply: u64,
        /// Read exactly this many bytes before replying instead of reading to EOF.
        #[arg(long)]
        read: Option<u64>,
        /// Exit after this many connections.
        #[arg(long)]
        connections: Option<u64>,
        /// Close each connection as soon as it is accepted (for churn): the server closes first.
        #[arg(long)]
        close_at_once: bool,
        /// Reply with this text instead of --reply bytes, so clients can tell servers apart.
        #[arg(long)]
        reply_name: Option<String>,
        /// Send the reply in 4 KiB pieces this many milliseconds apart.
        #[arg(long)]
        reply_every_ms: Option<u64>,
        /// Wait this many milliseconds after accepting before reading (data piles up unread).
        #[arg(long)]
        read_after_ms: Option<u64>,
    },
    /// One connection to --connect that sends --chunk bytes every --every-ms for --seconds,
    /// printing `{"event": "open", ...}` once connected; then shuts down writing, reads to the
    /// end and prints `{"event": "done", ...}` (a long-lived connection).
    TcpTrickle {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        chunk: u64,
        #[arg(long, default_value_t = 100)]
        every_ms: u64,
        #[arg(long)]
        seconds: f64,
    },
    /// Accepts connections and keeps them open, without a thread each, until killed.
    HoldServer {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Opens --count connections to --connect, prints `{"event": "held", ...}` and keeps them
    /// open until killed.
    HoldClient {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        count: u64,
    },
    /// Open --count connections to --connect; on each: shut down writing, read the server's
    /// name, check that getpeername() is --connect. Prints the count per server name.
    TcpSpray {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        count: u64,
    },
    /// One non-blocking connect to --connect: reports whether the call itself failed (and how)
    /// or started (EINPROGRESS), then how the connection ended.
    ConnectProbe {
        #[arg(long)]
        connect: SocketAddr,
    },
    /// --threads loops, together --rate connections per second to --connect for --seconds;
    /// each connection reads the server's name. Prints the connections per name and every
    /// failure with its start and end (CLOCK_MONOTONIC ns), its error, and whether
    /// connect() itself had succeeded.
    TcpLoad {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        rate: f64,
        #[arg(long)]
        seconds: f64,
        #[arg(long, default_value_t = 1)]
        threads: u32,
    },
    /// One blocking connect to --connect, with TCP_USER_TIMEOUT set to --user-timeout-ms
    /// first if given: prints the socket's TCP_USER_TIMEOUT once connected.
    UserTimeout {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        user_timeout_ms: Option<u32>,
        /// First connect the same socket here, and let it fail (a refused connect).
        #[arg(long)]
        first: Option<SocketAddr>,
    },
    /// Connect, send --send bytes, then receive (see --close).
    TcpClient {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        send: u64,
        /// Bytes the server will send back; with `--close close` exactly these are read.
        #[arg(long, default_value_t = 0)]
        expect: u64,
        #[arg(long, value_enum, default_value = "shutdown")]
        close: CloseMode,
    },
    /// Seal and open --bytes with AES-128-GCM in TLS 1.3's largest records (16 KiB), as the
    /// mesh's tunnels do (rustls on ring), --repeat times: prints the median µs (the crypto
    /// an exchange through the mesh cannot avoid, for benchmarks' bounds)
    Aead {
        #[arg(long)]
        bytes: usize,
        #[arg(long, default_value_t = 20)]
        repeat: usize,
    },
    /// Open and close TCP connections as fast as possible for --seconds; report the rate.
    Churn {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        seconds: f64,
        /// Stop after this many connections.
        #[arg(long)]
        count: Option<u64>,
        /// At most this many connections per second.
        #[arg(long)]
        rate: Option<f64>,
    },
    /// Request/response server for benchmarks, one connection at a time: read --size bytes,
    /// write --size bytes, wait for the client's close, close. The client closes first, so the
    /// server keeps no TIME_WAIT that a reused (or NATed) client port could collide with.
    RrServer {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Bytes answered to each request [default: --size] (a large request and a small
        /// answer: a stream one way).
        #[arg(long)]
        reply: Option<usize>,
        /// Keep-alive: serve every connection on its own thread, answering each --size
        /// request until the client closes.
        #[arg(long)]
        keepalive: bool,
        /// Move a request in pieces of at most this many bytes (one buffer that size, reused)
        /// instead of one buffer of the whole request: a stream as a proxy moves it.
        #[arg(long)]
        chunk: Option<usize>,
    },
    /// Request/response client: --count times connect, send --size bytes, read --size bytes,
    /// close with RST (no TIME_WAIT on either side). Reports latency percentiles and
    /// connections per second. Several --connect addresses (comma-separated) are taken in
    /// turn, as a Service's backends would be.
    Rr {
        #[arg(long, value_delimiter = ',', required = true)]
        connect: Vec<SocketAddr>,
        /// Connections to make; 0 with --bursts. With --keepalive: requests.
        #[arg(long, default_value_t = 0)]
        count: u64,
        /// Open this many connections once and send every request over them in turn (an
        /// established connection's cost) instead of a connection per request; latency is
        /// then per request.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        keepalive: Option<u16>,
        /// Take orders from stdin, one per line: a number N makes N more connections and
        /// prints `{"event": "burst"}`; `report` prints the results of every connection since
        /// the last report and starts over; EOF exits. Benchmarks interleave several such
        /// clients at a fine grain.
        #[arg(long)]
        bursts: bool,
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Bytes the server answers to each request [default: --size].
        #[arg(long)]
        reply: Option<usize>,
        /// Move a request in pieces of at most this many bytes (one buffer that size, reused)
        /// instead of one buffer of the whole request: a stream as a proxy moves it.
        #[arg(long)]
        chunk: Option<usize>,
    },
    /// Serve TCP and UDP on several ports at once, answering every connection and datagram
    /// with --name (the upstream NetworkPolicy e2e model: every pod serves 80 and 81).
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long = "tcp")]
        tcp: Vec<u16>,
        #[arg(long = "udp")]
        udp: Vec<u16>,
    },
    /// Measures how soon a change takes effect: for every line on stdin (`served` or
    /// `refused`), exchanges --size bytes with --connect (an rr-server) every --every-ms
    /// until the outcome is that one, then prints `{"event": "flipped", "ms": ...}` (from the
    /// line's arrival; `{"event": "timeout"}` after --timeout-ms).
    Flip {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 1)]
        every_ms: u64,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// Probe every target at once (`tcp:IP:PORT` or `udp:IP:PORT`; `tcp-dstopts:[IPv6]:PORT`
    /// sends its packets with a 520-byte destination options header, longer than the
    /// datapath parses): the name the server answered, or why not. One JSON line with every
    /// result.
    Probe {
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        targets: Vec<String>,
    },
    /// Send an ICMP message (IPv4, raw socket with our own IP header), whole or split in two
    /// fragments: a workload with CAP_NET_RAW trying to get around policy.
    RawIcmp {
        #[arg(long)]
        to: std::net::Ipv4Addr,
        /// ICMP type (0: echo reply, 3: unreachable, 8: echo request).
        #[arg(long, default_value_t = 0)]
        icmp_type: u8,
        /// Data after the ICMP header.
        #[arg(long)]
        data: String,
        /// Split the ICMP message into two fragments at this many bytes (a multiple of 8).
        #[arg(long)]
        split: Option<usize>,
    },
    /// The reply-path trick against policy: forge a datagram from --peer to ourselves on
    /// --port, then send to --peer from that socket.
    ForgeReplyPath {
        #[arg(long)]
        own: std::net::Ipv4Addr,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        peer: std::net::SocketAddrV4,
        #[arg(long)]
        data: String,
    },
    /// Ping --to from one raw ICMP socket for --seconds: how many replies came back.
    RawPing {
        #[arg(long)]
        to: std::net::Ipv4Addr,
        #[arg(long)]
        data: String,
        #[arg(long, default_value_t = 2)]
        seconds: u64,
    },
    /// Listen on a raw socket of an IP protocol for --seconds: how many packets carried
    /// --marker.
    RawReceive {
        #[arg(long, default_value_t = 1)]
        protocol: i32,
        #[arg(long)]
        marker: String,
        #[arg(long, default_value_t = 3)]
        seconds: u64,
    },
    /// Capture every frame of --iface for --seconds (AF_PACKET): how many carry --needle,
    /// and how many are TCP to or from --port.
    Capture {
        #[arg(long)]
        iface: String,
        #[arg(long)]
        needle: String,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// Echo UDP datagrams back to their sender, each after --delay-ms (one at a time),
    /// printing when each arrived and when its echo left.
    UdpEcho {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// Gather this many datagrams before echoing them all (that many exchanges pending at
        /// once).
        #[arg(long, default_value_t = 1)]
        batch: usize,
    },
    /// Send one datagram from each of --sockets UDP sockets to --to, then wait for every echo;
    /// prints how many came back.
    UdpMany {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        sockets: usize,
    },
    /// Open --sockets unconnected UDP sockets (IPv4), send one datagram from each to --to,
    /// print when all were sent, and keep them open for --hold-seconds (a workload filling
    /// the node with socket state).
    UdpFlood {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        sockets: u32,
        #[arg(long, default_value_t = 10)]
        hold_seconds: u64,
    },
    /// Send --count datagrams of --size bytes and wait for each echo.
    UdpClient {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u64,
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Use send_to/recv_from on an unconnected socket and check that every reply comes from
        /// --connect.
        #[arg(long)]
        unconnected: bool,
        /// How long to wait for each echo.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// --rounds times: one unconnected UDP socket sends to each --to, then reads one reply per
    /// target; the replies' sources must be the targets, each once (as a resolver asking
    /// several servers at once checks them).
    UdpPair {
        #[arg(long = "to", required = true)]
        to: Vec<SocketAddr>,
        #[arg(long, default_value_t = 10)]
        rounds: u32,
    },
    /// A stub resolver's client: one connected UDP socket, a query every --interval-ms for
    /// --seconds. A failed send or a reply that does not come within 500 ms closes it and
    /// opens a new one, as glibc's resolver does. Prints each answer (the server's name).
    UdpResolver {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 50)]
        interval_ms: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cpu.map_or(Ok(()), pin).and_then(|()| run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("{}", json!({"event": "error", "error": e}));
            ExitCode::FAILURE
        }
    }
}

/// Pins this process (and the threads it starts later) to `cpu`.
fn pin(cpu: usize) -> Result<(), String> {
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= 8 * size_of::<libc::cpu_set_t>() {
        return Err(format!("--cpu {cpu}: out of range"));
    }
    // SAFETY: `cpu` is below the set's size in bits, checked above.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: a valid set of the size passed; pid 0 is the calling thread, whose mask new
    // threads inherit.
    let ret = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set) };
    if ret == 0 {
        Ok(())
    } else {
        Err(format!("--cpu {cpu}: {}", std::io::Error::last_os_error()))
    }
}

fn emit(v: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    // A closed stdout must not kill the workload.
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn run(cmd: Cmd) -> Result<(), String> {
    match cmd {
        Cmd::TcpServer {
            listen,
            reply,
            read,
            connections,
            close_at_once,
            reply_name,
            reply_every_ms,
            read_after_ms,
        } => tcp_server(
            listen,
            Reply {
                bytes: reply,
                name: reply_name,
                every: reply_every_ms.map(Duration::from_millis),
            },
            Reading {
                limit: read,
                after: read_after_ms.map(Duration::from_millis),
            },
            connections,
            close_at_once,
        ),
        Cmd::TcpSpray { connect, count } => tcp_spray(connect, count),
        Cmd::TcpLoad {
            connect,
            rate,
            seconds,
            threads,
        } => tcp_load(connect, rate, seconds, threads),
        Cmd::UserTimeout {
            connect,
            user_timeout_ms,
            first,
        } => user_timeout(connect, user_timeout_ms, first),
        Cmd::HoldServer { listen } => hold_server(listen),
        Cmd::HoldClient { connect, count } => hold_client(connect, count),
        Cmd::TcpTrickle {
            connect,
            chunk,
            every_ms,
            seconds,
        } => tcp_trickle(connect, chunk, Duration::from_millis(every_ms), seconds),
        Cmd::ConnectProbe { connect } => connect_probe(connect),
        Cmd::TcpClient {
            connect,
            send,
            expect,
            close,
        } => tcp_client(connect, send, expect, close),
        Cmd::Churn {
            connect,
            seconds,
            count,
            rate,
        } => churn(connect, seconds, count, rate),
        Cmd::Aead { bytes, repeat } => aead(bytes, repeat),
        Cmd::RawIcmp {
            to,
            icmp_type,
            data,
            split,
        } => raw::send(to, 1, &raw::icmp(icmp_type, 7, data.as_bytes()), split),
        Cmd::ForgeReplyPath {
            own,
            port,
            peer,
            data,
        } => raw::forge_reply_path(own, port, peer, data.as_bytes()),
        Cmd::RawPing { to, data, seconds } => {
            raw::ping(to, data.as_bytes(), Duration::from_secs(seconds))
        }
        Cmd::RawReceive {
            protocol,
            marker,
            seconds,
        } => raw::receive(protocol, marker.as_bytes(), Duration::from_secs(seconds)),
        Cmd::Capture {
            iface,
            needle,
            port,
            seconds,
        } => raw::capture(
            &iface,
            needle.as_bytes(),
            port,
            Duration::from_secs(seconds),
        ),
        Cmd::UdpEcho {
            listen,
            delay_ms,
            batch,
        } => udp_echo(listen, Duration::from_millis(delay_ms), batch),
        Cmd::UdpMany { to, sockets } => udp_many(to, sockets),
        Cmd::UdpFlood {
            to,
            sockets,
            hold_seconds,
        } => udp_flood(to, sockets, Duration::from_secs(hold_seconds)),
        Cmd::Serve { name, tcp, udp } => serve_many(&name, &tcp, &udp),
        Cmd::Probe {
            timeout_ms,
            targets,
        } => probe(Duration::from_millis(timeout_ms), &targets),
        Cmd::RrServer {
            listen,
            size,
            reply,
            keepalive,
            chunk,
        } => rr_server(listen, (size, reply.unwrap_or(size)), keepalive, chunk),
        Cmd::Rr {
            connect,
            count,
            size,
            reply,
            bursts,
            keepalive,
            chunk,
        } => {
            let mut rr = Rr::new(connect, (size, reply.unwrap_or(size)), keepalive, chunk)?;
            if bursts {
                rr.serve_orders()
            } else {
                rr.run(count)?;
                rr.report();
                Ok(())
            }
        }
        Cmd::UdpClient {
            connect,
            count,
            size,
            unconnected,
            timeout_ms,
        } => udp_client(
            connect,
            count,
            size,
            unconnected,
            Duration::from_millis(timeout_ms),
        ),
        Cmd::UdpPair { to, rounds } => udp_pair(&to, rounds),
        Cmd::Flip {
            connect,
            size,
            every_ms,
            timeout_ms,
        } => flip(
            connect,
            size,
            Duration::from_millis(every_ms),
            Duration::from_millis(timeout_ms),
        ),
        Cmd::UdpResolver {
            connect,
            seconds,
            interval_ms,
        } => udp_resolver(connect, seconds, interval_ms),
    }
}

/// What a server sends back.
/// How a server reads a connection: this many bytes before replying (None: to EOF), after
/// waiting this long.
#[derive(Clone, Copy)]
struct Reading {
    limit: Option<u64>,
    after: Option<Duration>,
}

#[derive(Debug, Clone)]
struct Reply {
    bytes: u64,
    name: Option<String>,
    /// Send the bytes in 4 KiB pieces this far apart (a slow, long reply).
    every: Option<Duration>,
}

fn tcp_server(
    listen: SocketAddr,
    reply: Reply,
    read: Reading,
    connections: Option<u64>,
    close_at_once: bool,
) -> Result<(), String> {
    let listener = TcpListener::bind(listen).map_err(|e| format!("bind {listen}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    emit(&json!({"event": "listening", "addr": local.to_string()}));
    let mut served = 0u64;
    let mut handles = Vec::new();
    while connections.is_none_or(|n| served < n) {
        let (stream, peer) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        served += 1;
        if close_at_once {
            drop(stream);
            continue;
        }
        let reply = reply.clone();
        let handle = thread::spawn(move || {
            let result = serve(stream, &reply, read);
            match result {
                // A long-running server (no --connections) stays quiet per connection.
                Ok(_) if connections.is_none() => {}
                Ok((local, received, sent)) => emit(&json!({
                    "event": "served", "peer": peer.to_string(), "local": local,
                    "received": received, "sent": sent,
                })),
                Err(e) => emit(&json!({"event": "error", "peer": peer.to_string(), "error": e})),
            }
        });
        // Only a server with a known end waits for its connections.
        if connections.is_some() {
            handles.push(handle);
        }
    }
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

/// Serves one connection; returns (local address, bytes received, bytes sent).
fn serve(
    mut stream: TcpStream,
    reply: &Reply,
    read: Reading,
) -> Result<(String, u64, u64), String> {
    let local = stream.local_addr().map_err(|e| e.to_string())?.to_string();
    if let Some(after) = read.after {
        thread::sleep(after);
    }
    match read.limit {
        // Clients here write the pattern: what arrives is checked, in order.
        None => {
            let received = read_up_to(&mut stream, None, Some(0))?;
            let sent = send_reply(&mut stream, reply)?;
            Ok((local, received, sent))
        }
        Some(n) => {
            let got = read_up_to(&mut stream, Some(n), Some(0))?;
            let sent = send_reply(&mut stream, reply)?;
            // Wait for the peer's FIN so the peer closes first.
            let rest = read_up_to(&mut stream, None, Some(got))?;
            Ok((local, got + rest, sent))
        }
    }
}

fn send_reply(stream: &mut TcpStream, reply: &Reply) -> Result<u64, String> {
    match &reply.name {
        Some(name) => {
            stream
                .write_all(name.as_bytes())
                .map_err(|e| format!("write: {e}"))?;
            Ok(name.len() as u64)
        }
        None => match reply.every {
            None => write_bytes(stream, 0, reply.bytes),
            Some(every) => {
                let mut sent = 0;
                while sent < reply.bytes {
                    sent += write_bytes(stream, sent, (reply.bytes - sent).min(4096))?;
                    thread::sleep(every);
                }
                Ok(sent)
            }
        },
    }
}

/// Reads up to `n` bytes (fewer only at EOF).
fn read_exactly(stream: &mut TcpStream, n: u64) -> Result<u64, String> {
    read_up_to(stream, Some(n), None)
}

fn drain(stream: &mut TcpStream) -> Result<u64, String> {
    read_up_to(stream, None, None)
}

/// Reads until EOF or `limit` bytes; with `checked_from`, each byte must be the pattern's at
/// its offset in the stream (see [`pattern`]). Returns the bytes read.
fn read_up_to(
    stream: &mut TcpStream,
    limit: Option<u64>,
    checked_from: Option<u64>,
) -> Result<u64, String> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    while limit.is_none_or(|n| total < n) {
        let want = limit.map_or(buf.len(), |n| (n - total).min(buf.len() as u64) as usize);
        match stream.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(got) => {
                if let Some(from) = checked_from {
                    let at = from + total;
                    if buf[..got] != pattern_at(at)[..got] {
                        return Err(format!(
                            "bytes {at}..{} are not the stream's: data arrived out of order",
                            at + got as u64
                        ));
                    }
                }
                total += got as u64;
            }
            Err(e) if retry(&e) => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    Ok(total)
}

/// Whether a read of a blocking socket without a timeout should be tried again. EAGAIN is
/// one: with weft's `--sockmap` the kernel's receive path of a paired socket
/// (tcp_bpf_recvmsg) returns it when a wakeup finds no data (event-loop applications take it
/// as "not ready"; blocking ones must retry).
fn retry(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
    )
}

/// Fills `buf` from a blocking socket without a timeout (see [`retry`]).
/// Reads exactly `total` bytes, `buf` (reused) at a time.
fn read_pieces(s: &mut TcpStream, buf: &mut [u8], total: usize) -> std::io::Result<()> {
    let mut left = total;
    while left > 0 {
        let n = left.min(buf.len());
        read_full(s, &mut buf[..n])?;
        left -= n;
    }
    Ok(())
}

/// Writes `total` bytes, `piece` (repeated) at a time.
fn write_pieces(s: &mut TcpStream, piece: &[u8], total: usize) -> std::io::Result<()> {
    let mut left = total;
    while left > 0 {
        let n = left.min(piece.len());
        s.write_all(&piece[..n])?;
        left -= n;
    }
    Ok(())
}

fn read_full(s: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if retry(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Byte `i` of every stream a TCP writer here sends is `i % 251`: a reader can tell data
/// delivered out of order (a prime period, so no segment or buffer size lines up with it).
const PERIOD: usize = 251;

/// The pattern from stream offset `at`, 64 KiB of it.
fn pattern_at(at: u64) -> &'static [u8] {
    static PATTERN: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let p = PATTERN.get_or_init(|| {
        (0..64 * 1024 + PERIOD)
            .map(|i| (i % PERIOD) as u8)
            .collect()
    });
    &p[(at % PERIOD as u64) as usize..][..64 * 1024]
}

/// Writes `n` bytes of the pattern from stream offset `from`; returns how many the socket
/// accepted (what the caller reports).
fn write_bytes(stream: &mut TcpStream, from: u64, n: u64) -> Result<u64, String> {
    let mut written = 0u64;
    while written < n {
        let buf = pattern_at(from + written);
        let chunk = (n - written).min(buf.len() as u64) as usize;
        match stream.write(&buf[..chunk]) {
            Ok(0) => return Err(format!("write: connection closed after {written} bytes")),
            Ok(k) => written += k as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("write after {written} bytes: {e}")),
        }
    }
    Ok(written)
}

fn tcp_client(connect: SocketAddr, send: u64, expect: u64, close: CloseMode) -> Result<(), String> {
    let mut stream = TcpStream::connect(connect).map_err(|e| format!("connect {connect}: {e}"))?;
    let local = stream.local_addr().map_err(|e| e.to_string())?;
    let peer = stream.peer_addr().map_err(|e| e.to_string())?;
    let sent = write_bytes(&mut stream, 0, send)?;
    let received = match close {
        CloseMode::Shutdown => {
            stream
                .shutdown(Shutdown::Write)
                .map_err(|e| format!("shutdown: {e}"))?;
            drain(&mut stream)?
        }
        CloseMode::Close => read_exactly(&mut stream, expect)?,
    };
    drop(stream);
    emit(&json!({
        "event": "done", "local": local.to_string(), "remote": peer.to_string(),
        "sent": sent, "received": received,
    }));
    if received == expect {
        Ok(())
    } else {
        Err(format!("received {received} bytes, expected {expect}"))
    }
}

/// Raises the open-files limit (soft and hard) to at least `n`: root may.
fn raise_nofile_to(n: u64) {
    let lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: plain setrlimit on a valid struct; a failure leaves the old limit.
    unsafe {
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

/// Raises the open-files limit to its hard maximum (holding thousands of sockets).
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn hold_server(listen: SocketAddr) -> Result<(), String> {
    raise_nofile();
    let listener = TcpListener::bind(listen).map_err(|e| format!("bind {listen}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    emit(&json!({"event": "listening", "addr": local.to_string()}));
    let mut held = Vec::new();
    loop {
        let (stream, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        held.push(stream);
    }
}

fn hold_client(connect: SocketAddr, count: u64) -> Result<(), String> {
    raise_nofile();
    let mut held = Vec::new();
    for i in 0..count {
        let s = TcpStream::connect(connect)
            .map_err(|e| format!("connect {connect} (connection {i}): {e}"))?;
        held.push(s);
    }
    emit(&json!({"event": "held", "connections": held.len()}));
    loop {
        thread::sleep(Duration::from_secs(3600));
    }
}

fn tcp_trickle(
    connect: SocketAddr,
    chunk: u64,
    every: Duration,
    seconds: f64,
) -> Result<(), String> {
    let mut stream = TcpStream::connect(connect).map_err(|e| format!("connect {connect}: {e}"))?;
    let local = stream.local_addr().map_err(|e| e.to_string())?;
    let peer = stream.peer_addr().map_err(|e| e.to_string())?;
    emit(&json!({"event": "open", "local": local.to_string(), "remote": peer.to_string()}));
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let mut sent = 0;
    while Instant::now() < end {
        sent += write_bytes(&mut stream, sent, chunk)?;
        thread::sleep(every);
    }
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let received = drain(&mut stream)?;
    emit(&json!({
        "event": "done", "local": local.to_string(), "remote": peer.to_string(),
        "sent": sent, "received": received,
    }));
    Ok(())
}

fn churn(
    connect: SocketAddr,
    seconds: f64,
    count: Option<u64>,
    rate: Option<f64>,
) -> Result<(), String> {
    let start = Instant::now();
    let limit = Duration::from_secs_f64(seconds);
    let mut connections = 0u64;
    let mut errors = 0u64;
    let mut buf = [0u8; 16];
    while start.elapsed() < limit && count.is_none_or(|n| connections + errors < n) {
        if let Some(rate) = rate {
            let due = start + Duration::from_secs_f64((connections + errors) as f64 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
        }
        match TcpStream::connect(connect) {
            Ok(mut s) => {
                // The server closes first; wait for its FIN so the client never holds TIME_WAIT.
                let _ = s.read(&mut buf);
                connections += 1;
            }
            Err(_) => errors += 1,
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    emit(&json!({
        "event": "churn", "connections": connections, "errors": errors,
        "seconds": elapsed, "per_second": connections as f64 / elapsed,
    }));
    if errors == 0 {
        Ok(())
    } else {
        Err(format!("{errors} connects failed"))
    }
}

fn aead(bytes: usize, repeat: usize) -> Result<(), String> {
    use ring::aead::{AES_128_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
    const RECORD: usize = 16 << 10;
    const TAG: usize = 16;
    let key = UnboundKey::new(&AES_128_GCM, &[7; 16]).map_err(|e| format!("key: {e}"))?;
    let key = LessSafeKey::new(key);
    let nonce = |seq: u64| {
        let mut n = [0u8; NONCE_LEN];
        n[4..].copy_from_slice(&seq.to_be_bytes());
        Nonce::assume_unique_for_key(n)
    };
    let mut record = vec![0x5a_u8; RECORD + TAG];
    let mut times = Vec::with_capacity(repeat);
    for _ in 0..repeat.max(1) {
        let start = Instant::now();
        let (mut left, mut seq) = (bytes, 0u64);
        while left > 0 {
            let n = left.min(RECORD);
            // TLS 1.3's additional data: the record header (the length counts the inner
            // content type's byte and the tag).
            let length = u16::try_from(n + 1 + TAG).map_err(|e| e.to_string())?;
            let [high, low] = length.to_be_bytes();
            let header = [23, 3, 3, high, low];
            let tag = key
                .seal_in_place_separate_tag(nonce(seq), Aad::from(header), &mut record[..n])
                .map_err(|e| format!("seal: {e}"))?;
            record[n..n + TAG].copy_from_slice(tag.as_ref());
            key.open_in_place(nonce(seq), Aad::from(header), &mut record[..n + TAG])
                .map_err(|e| format!("open: {e}"))?;
            left -= n;
            seq += 1;
        }
        times.push(start.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    emit(&json!({
        "event": "aead", "bytes": bytes, "repeat": times.len(),
        "p50_us": times[times.len() / 2], "min_us": times[0],
    }));
    Ok(())
}

fn tcp_spray(connect: SocketAddr, count: u64) -> Result<(), String> {
    /// Failures listed one by one, at most.
    const LISTED: usize = 1000;
    let mut counts: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    let (mut errors, mut peer_mismatches) = (0u64, 0u64);
    let mut last_error = String::new();
    let mut failures = Vec::new();
    for _ in 0..count {
        let started = Instant::now();
        let result = (|| -> Result<(String, bool), (&str, std::io::Error)> {
            let mut s = TcpStream::connect(connect).map_err(|e| ("connect", e))?;
            let peer_ok = s.peer_addr().map_err(|e| ("getpeername", e))? == connect;
            s.shutdown(Shutdown::Write).map_err(|e| ("shutdown", e))?;
            let mut name = String::new();
            s.read_to_string(&mut name).map_err(|e| ("read", e))?;
            Ok((name, peer_ok))
        })();
        match result {
            Ok((name, peer_ok)) => {
                *counts.entry(name).or_default() += 1;
                peer_mismatches += u64::from(!peer_ok);
            }
            Err((call, e)) => {
                errors += 1;
                last_error = format!("{call}: {e}");
                if failures.len() < LISTED {
                    failures.push(json!({
                        "call": call, "error": errno_name(&e),
                        "ms": started.elapsed().as_millis() as u64,
                    }));
                }
            }
        }
    }
    emit(&json!({
        "event": "spray", "counts": counts, "errors": errors, "last_error": last_error,
        "peer_mismatches": peer_mismatches, "failures": failures,
    }));
    Ok(())
}

/// One loop of [`tcp_load`]: connections per server name, and failures (start, end, error).
type LoadLoop = (
    std::collections::BTreeMap<String, u64>,
    Vec<(u64, u64, String, bool)>,
);

fn tcp_load(connect: SocketAddr, rate: f64, seconds: f64, threads: u32) -> Result<(), String> {
    /// Failures listed, at most (per loop).
    const LISTED: usize = 50_000;
    let threads = threads.max(1);
    let per_loop = rate / f64::from(threads);
    let run = move || -> LoadLoop {
        let (mut counts, mut failures) = (std::collections::BTreeMap::new(), Vec::new());
        let start = Instant::now();
        let limit = Duration::from_secs_f64(seconds);
        let mut n = 0u64;
        while start.elapsed() < limit {
            let due = start + Duration::from_secs_f64(n as f64 / per_loop);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
            n += 1;
            let began = weft_testkit::proc::monotonic_ns();
            // Failures say whether connect() itself succeeded.
            let result = (|| -> Result<String, (std::io::Error, bool)> {
                let mut s = TcpStream::connect(connect).map_err(|e| (e, false))?;
                s.set_read_timeout(Some(Duration::from_secs(2)))
                    .map_err(|e| (e, true))?;
                s.shutdown(Shutdown::Write).map_err(|e| (e, true))?;
                let mut name = String::new();
                s.read_to_string(&mut name).map_err(|e| (e, true))?;
                Ok(name)
            })();
            match result {
                Ok(name) => *counts.entry(name).or_default() += 1,
                Err((e, connected)) if failures.len() < LISTED => {
                    failures.push((
                        began,
                        weft_testkit::proc::monotonic_ns(),
                        errno_name(&e),
                        connected,
                    ));
                }
                Err(_) => {}
            }
        }
        (counts, failures)
    };
    let loops: Vec<_> = (0..threads).map(|_| thread::spawn(run)).collect();
    let mut counts: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    let mut failures = Vec::new();
    for l in loops {
        let (c, f) = l.join().map_err(|_| "a load loop panicked".to_owned())?;
        for (name, n) in c {
            *counts.entry(name).or_default() += n;
        }
        failures.extend(f);
    }
    failures.sort_unstable();
    let failures: Vec<_> = failures
        .into_iter()
        .map(|(start, end, error, connected)| {
            json!({"start_ns": start, "end_ns": end, "error": error, "connected": connected})
        })
        .collect();
    emit(&json!({"event": "load", "counts": counts, "failures": failures}));
    Ok(())
}

fn user_timeout(
    connect: SocketAddr,
    set: Option<u32>,
    first: Option<SocketAddr>,
) -> Result<(), String> {
    let domain = if connect.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); the descriptor is owned by the OwnedFd below.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let len = std::mem::size_of::<u32>() as libc::socklen_t;
    if let Some(ms) = set {
        // SAFETY: `ms` is a u32 of `len` bytes.
        let ret = unsafe {
            libc::setsockopt(
                raw,
                libc::IPPROTO_TCP,
                libc::TCP_USER_TIMEOUT,
                std::ptr::from_ref(&ms).cast(),
                len,
            )
        };
        if ret != 0 {
            return Err(format!("setsockopt: {}", std::io::Error::last_os_error()));
        }
    }
    if let Some(first) = first {
        let (storage, addr_len) = sockaddr(first);
        // SAFETY: `storage` holds a valid sockaddr of `addr_len` bytes.
        if unsafe { libc::connect(raw, std::ptr::from_ref(&storage).cast(), addr_len) } == 0 {
            return Err(format!("connect {first}: it was meant to fail"));
        }
    }
    let (storage, addr_len) = sockaddr(connect);
    // SAFETY: `storage` holds a valid sockaddr of `addr_len` bytes.
    if unsafe { libc::connect(raw, std::ptr::from_ref(&storage).cast(), addr_len) } != 0 {
        return Err(format!("connect: {}", std::io::Error::last_os_error()));
    }
    let (mut ms, mut got) = (0u32, len);
    // SAFETY: `ms` is a writable u32 of `got` bytes.
    let ret = unsafe {
        libc::getsockopt(
            raw,
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            std::ptr::from_mut(&mut ms).cast(),
            &raw mut got,
        )
    };
    if ret != 0 {
        return Err(format!("getsockopt: {}", std::io::Error::last_os_error()));
    }
    emit(&json!({"event": "user_timeout", "ms": ms}));
    Ok(())
}

fn connect_probe(connect: SocketAddr) -> Result<(), String> {
    let domain = if connect.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); the descriptor is owned by the OwnedFd below.
    let fd = unsafe {
        libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let (storage, len) = sockaddr(connect);
    let started = Instant::now();
    // SAFETY: `storage` holds a valid sockaddr of `len` bytes for `connect`.
    let ret = unsafe { libc::connect(raw, std::ptr::from_ref(&storage).cast(), len) };
    let call_error = (ret != 0).then(std::io::Error::last_os_error);
    let call_us = started.elapsed().as_micros() as u64;
    let immediate = match &call_error {
        None => "connected".to_owned(),
        Some(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => "in_progress".to_owned(),
        Some(e) => errno_name(e),
    };
    emit(&json!({"event": "probe", "immediate": immediate, "call_us": call_us}));
    Ok(())
}

fn errno_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::ENETUNREACH) => "ENETUNREACH".into(),
        Some(libc::EHOSTUNREACH) => "EHOSTUNREACH".into(),
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::ETIMEDOUT) => "ETIMEDOUT".into(),
        Some(libc::ECONNRESET) => "ECONNRESET".into(),
        _ => e.to_string(),
    }
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            unsafe { std::ptr::write(std::ptr::from_mut(&mut storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in6.
            unsafe { std::ptr::write(std::ptr::from_mut(&mut storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn rr_server(
    listen: SocketAddr,
    (size, reply): (usize, usize),
    keepalive: bool,
    chunk: Option<usize>,
) -> Result<(), String> {
    let listener = TcpListener::bind(listen).map_err(|e| format!("bind {listen}: {e}"))?;
    emit(
        &json!({"event": "listening", "addr": listener.local_addr().map_err(|e| e.to_string())?.to_string()}),
    );
    let piece = chunk.unwrap_or(size).clamp(1, size.max(1));
    let (mut buf, answer) = (vec![0u8; piece], vec![0u8; reply]);
    loop {
        let (mut s, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        if keepalive {
            let answer = answer.clone();
            thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let mut buf = vec![0u8; piece];
                while read_pieces(&mut s, &mut buf, size).is_ok() && s.write_all(&answer).is_ok() {}
            });
            continue;
        }
        // A broken client must not stop the server.
        if read_pieces(&mut s, &mut buf, size).is_ok() && s.write_all(&answer).is_ok() {
            let mut end = [0u8; 1];
            let _ = s.read(&mut end);
        }
    }
}

/// The request/response client: its targets, taken in turn, and its results so far.
struct Rr {
    targets: Vec<SocketAddr>,
    next: usize,
    /// A request's bytes, sent `request` (its whole length, or --chunk) at a time.
    size: usize,
    request: Vec<u8>,
    reply: Vec<u8>,
    latencies_ns: Vec<u64>,
    busy: Duration,
    /// With --keepalive: the open connections requests take in turn.
    open: Vec<TcpStream>,
}

impl Rr {
    fn new(
        targets: Vec<SocketAddr>,
        (size, reply): (usize, usize),
        keepalive: Option<u16>,
        chunk: Option<usize>,
    ) -> Result<Self, String> {
        let open = (0..usize::from(keepalive.unwrap_or(0)))
            .map(|i| {
                let to = targets[i % targets.len()];
                let s = TcpStream::connect(to).map_err(|e| format!("connect {to}: {e}"))?;
                s.set_nodelay(true)
                    .map_err(|e| format!("TCP_NODELAY: {e}"))?;
                Ok(s)
            })
            .collect::<Result<_, String>>()?;
        Ok(Self {
            targets,
            next: 0,
            size,
            request: vec![0x42; chunk.unwrap_or(size).clamp(1, size.max(1))],
            reply: vec![0; reply],
            latencies_ns: Vec::new(),
            busy: Duration::ZERO,
            open,
        })
    }

    fn run(&mut self, count: u64) -> Result<(), String> {
        if self.open.is_empty() {
            self.connections(count)
        } else {
            self.requests(count)
        }
    }

    /// `count` requests over the open connections, in turn.
    fn requests(&mut self, count: u64) -> Result<(), String> {
        let started = Instant::now();
        for _ in 0..count {
            let n = self.open.len();
            let s = &mut self.open[self.next % n];
            self.next += 1;
            let t = Instant::now();
            write_pieces(s, &self.request, self.size).map_err(|e| format!("write: {e}"))?;
            read_full(s, &mut self.reply).map_err(|e| format!("read: {e}"))?;
            self.latencies_ns.push(t.elapsed().as_nanos() as u64);
        }
        self.busy += started.elapsed();
        Ok(())
    }

    /// `count` connections, each with one request.
    fn connections(&mut self, count: u64) -> Result<(), String> {
        let started = Instant::now();
        for _ in 0..count {
            let connect = self.targets[self.next % self.targets.len()];
            self.next += 1;
            let t = Instant::now();
            let mut s =
                TcpStream::connect(connect).map_err(|e| format!("connect {connect}: {e}"))?;
            write_pieces(&mut s, &self.request, self.size).map_err(|e| format!("write: {e}"))?;
            read_full(&mut s, &mut self.reply).map_err(|e| format!("read: {e}"))?;
            abort_on_close(&s)?;
            drop(s);
            self.latencies_ns.push(t.elapsed().as_nanos() as u64);
        }
        self.busy += started.elapsed();
        Ok(())
    }

    /// Prints the results since the last report, and starts over.
    fn report(&mut self) {
        let mut l = std::mem::take(&mut self.latencies_ns);
        let seconds = std::mem::take(&mut self.busy).as_secs_f64();
        l.sort_unstable();
        let pct = |p: f64| {
            l.get(((l.len() as f64 - 1.0) * p).round() as usize)
                .map_or(f64::NAN, |&ns| ns as f64 / 1000.0)
        };
        emit(&json!({
            "event": "rr", "count": l.len(), "seconds": seconds,
            "per_second": l.len() as f64 / seconds, "p50_us": pct(0.5), "p99_us": pct(0.99),
        }));
    }

    fn serve_orders(&mut self) -> Result<(), String> {
        for line in std::io::stdin().lines() {
            let line = line.map_err(|e| format!("stdin: {e}"))?;
            match line.trim() {
                "report" => self.report(),
                n => {
                    let n = n.parse().map_err(|e| format!("order {n:?}: {e}"))?;
                    self.run(n)?;
                    emit(&json!({"event": "burst", "count": n}));
                }
            }
        }
        Ok(())
    }
}

/// Closes with RST (SO_LINGER 0) instead of leaving TIME_WAIT: thousands of TIME_WAIT sockets
/// to one destination make the kernel's ephemeral port search, not the path measured, the cost
/// of `connect()` (milliseconds per call after ~10 000 connections).
fn abort_on_close(s: &TcpStream) -> Result<(), String> {
    use std::os::fd::AsRawFd as _;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket descriptor and a `linger` value of the size passed.
    let ret = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(format!("SO_LINGER: {}", std::io::Error::last_os_error()))
    }
}

fn udp_echo(listen: SocketAddr, delay: Duration, batch: usize) -> Result<(), String> {
    let socket = UdpSocket::bind(listen).map_err(|e| format!("bind {listen}: {e}"))?;
    emit(
        &json!({"event": "listening", "addr": socket.local_addr().map_err(|e| e.to_string())?.to_string()}),
    );
    let mut buf = vec![0u8; 65_536];
    let mut pending = Vec::with_capacity(batch);
    loop {
        let (n, peer) = socket
            .recv_from(&mut buf)
            .map_err(|e| format!("recv: {e}"))?;
        pending.push((buf[..n].to_vec(), peer));
        if pending.len() < batch.max(1) {
            continue;
        }
        if !delay.is_zero() {
            emit(&json!({"event": "received", "from": peer.to_string(), "at_ms": unix_ms()}));
            thread::sleep(delay);
        }
        for (data, peer) in pending.drain(..) {
            socket
                .send_to(&data, peer)
                .map_err(|e| format!("send: {e}"))?;
        }
        if !delay.is_zero() {
            emit(&json!({"event": "echoed", "to": peer.to_string(), "at_ms": unix_ms()}));
        }
    }
}

fn udp_many(to: SocketAddr, sockets: usize) -> Result<(), String> {
    let bind = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let all = (0..sockets)
        .map(|i| {
            let s = UdpSocket::bind(bind).map_err(|e| format!("bind socket {i}: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))
                .map_err(|e| e.to_string())?;
            s.send_to(b"many", to)
                .map_err(|e| format!("send_to from socket {i}: {}", errno_name(&e)))?;
            Ok(s)
        })
        .collect::<Result<Vec<_>, String>>()?;
    let mut buf = [0u8; 64];
    let echoed = all.iter().filter(|s| s.recv_from(&mut buf).is_ok()).count();
    emit(&json!({"event": "done", "sockets": sockets, "echoed": echoed}));
    if echoed == sockets {
        Ok(())
    } else {
        Err(format!("{echoed} of {sockets} echoes"))
    }
}

/// Milliseconds since the Unix epoch (to order events of several processes).
fn unix_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

fn udp_flood(to: SocketAddr, sockets: u32, hold: Duration) -> Result<(), String> {
    raise_nofile_to(u64::from(sockets) + 1024);
    let mut held = Vec::with_capacity(sockets as usize);
    for i in 0..sockets {
        // More sockets than a namespace has ephemeral ports: they share a few, as SO_REUSEADDR
        // lets UDP sockets do.
        let socket = reusable_udp(FLOOD_PORT + (i % FLOOD_PORTS) as u16)
            .map_err(|e| format!("socket {i}: {e}"))?;
        socket
            .send_to(b"flood", to)
            .map_err(|e| format!("send_to from socket {i}: {}", errno_name(&e)))?;
        held.push(socket);
    }
    emit(&json!({"event": "flooded", "sockets": held.len(), "at_ms": unix_ms()}));
    thread::sleep(hold);
    Ok(())
}

/// The first of the local ports flood sockets share, and how many.
const FLOOD_PORT: u16 = 40_000;
const FLOOD_PORTS: u32 = 4096;

/// An IPv4 UDP socket with SO_REUSEADDR bound to 0.0.0.0:`port`.
fn reusable_udp(port: u16) -> Result<UdpSocket, String> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: plain socket(2); the descriptor is owned by the UdpSocket below or closed.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a socket we own; from here the UdpSocket closes it.
    let socket = unsafe { UdpSocket::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: 0 },
        sin_zero: [0; 8],
    };
    // SAFETY: valid option and address buffers of the sizes passed.
    let ok = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
            && libc::bind(
                fd,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            ) == 0
    };
    if !ok {
        return Err(format!("bind :{port}: {}", std::io::Error::last_os_error()));
    }
    Ok(socket)
}

fn udp_client(
    connect: SocketAddr,
    count: u64,
    size: usize,
    unconnected: bool,
    timeout: Duration,
) -> Result<(), String> {
    let bind: SocketAddr = if connect.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .map_err(|e| format!("{e}"))?;
    let socket = UdpSocket::bind(bind).map_err(|e| format!("bind: {e}"))?;
    if !unconnected {
        socket
            .connect(connect)
            .map_err(|e| format!("connect {connect}: {e}"))?;
    }
    socket
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let payload = vec![0xa5u8; size];
    let mut buf = vec![0u8; 65_536];
    let (mut echoed, mut wrong_source) = (0u64, 0u64);
    for _ in 0..count {
        let n = if unconnected {
            socket
                .send_to(&payload, connect)
                .map_err(|e| format!("send_to: {}", errno_name(&e)))?;
            let (n, from) = socket
                .recv_from(&mut buf)
                .map_err(|e| format!("recv_from: {e}"))?;
            wrong_source += u64::from(from != connect);
            n
        } else {
            socket
                .send(&payload)
                .map_err(|e| format!("send: {}", errno_name(&e)))?;
            socket.recv(&mut buf).map_err(|e| format!("recv: {e}"))?
        };
        if n == size {
            echoed += 1;
        }
    }
    emit(&json!({
        "event": "done", "local": socket.local_addr().map_err(|e| e.to_string())?.to_string(),
        "remote": connect.to_string(), "sent": count, "echoed": echoed, "wrong_source": wrong_source,
    }));
    if echoed == count && wrong_source == 0 {
        Ok(())
    } else {
        Err(format!(
            "{echoed} of {count} echoed, {wrong_source} from another address than {connect}"
        ))
    }
}

/// See `Cmd::Flip`. The outcome must be seen twice in a row (a transient failure is not a
/// refusal); the time is that of the first of the two.
fn flip(
    connect: SocketAddr,
    size: usize,
    every: Duration,
    timeout: Duration,
) -> Result<(), String> {
    for line in std::io::stdin().lines() {
        let line = line.map_err(|e| format!("stdin: {e}"))?;
        let want = match line.trim() {
            "served" => true,
            "refused" => false,
            other => return Err(format!("unknown order {other:?}")),
        };
        let started = Instant::now();
        let (mut attempts, mut first_seen) = (0u64, None::<Duration>);
        loop {
            attempts += 1;
            let at = started.elapsed();
            if exchanged(connect, size) == want {
                if let Some(first) = first_seen {
                    let ms = first.as_secs_f64() * 1000.0;
                    emit(&json!({"event": "flipped", "ms": ms, "attempts": attempts}));
                    break;
                }
                first_seen = Some(at);
            } else {
                first_seen = None;
            }
            if started.elapsed() > timeout {
                emit(&json!({"event": "timeout", "attempts": attempts}));
                break;
            }
            std::thread::sleep(every);
        }
    }
    Ok(())
}

/// Whether one connection to `connect` exchanged `size` bytes each way within a second (a
/// meshed client's connect is accepted by its node's proxy at once: only the reply tells it
/// was served).
fn exchanged(connect: SocketAddr, size: usize) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&connect, Duration::from_secs(1)) else {
        return false;
    };
    let deadline = Instant::now() + Duration::from_secs(1);
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut ok = s.write_all(&vec![7u8; size]).is_ok();
    let mut got = 0;
    let mut reply = vec![0u8; size];
    while ok && got < size {
        // A read timeout ends it (read_full would retry it).
        match s.read(&mut reply[got..]) {
            Ok(0) | Err(_) => ok = false,
            Ok(n) => got += n,
        }
        ok &= Instant::now() < deadline;
    }
    let _ = abort_on_close(&s);
    ok
}

fn udp_pair(to: &[SocketAddr], rounds: u32) -> Result<(), String> {
    let mut wrong = 0;
    for round in 0..rounds {
        let bind = if to[0].is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let socket = UdpSocket::bind(bind).map_err(|e| format!("bind: {e}"))?;
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        for target in to {
            socket
                .send_to(b"query", target)
                .map_err(|e| format!("send_to {target}: {}", errno_name(&e)))?;
        }
        let mut sources = Vec::new();
        let mut buf = [0u8; 512];
        for _ in to {
            let (_, from) = socket
                .recv_from(&mut buf)
                .map_err(|e| format!("recv_from: {e}"))?;
            sources.push(from);
        }
        let mut want = to.to_vec();
        let mut got = sources.clone();
        want.sort();
        got.sort();
        wrong += u32::from(want != got);
        emit(
            &json!({"event": "round", "round": round, "sources": sources.iter().map(ToString::to_string).collect::<Vec<_>>()}),
        );
    }
    if wrong == 0 {
        Ok(())
    } else {
        Err(format!(
            "{wrong} of {rounds} rounds saw a reply from another source than its target"
        ))
    }
}

/// A connected UDP socket to `connect`, with a half-second reply timeout.
fn resolver_socket(connect: SocketAddr) -> Result<UdpSocket, String> {
    let bind = if connect.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let socket = UdpSocket::bind(bind).map_err(|e| format!("bind: {e}"))?;
    socket
        .connect(connect)
        .map_err(|e| format!("connect {connect}: {e}"))?;
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(|e| e.to_string())?;
    Ok(socket)
}

fn udp_resolver(connect: SocketAddr, seconds: u64, interval_ms: u64) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut socket = resolver_socket(connect)?;
    let mut buf = [0u8; 512];
    while Instant::now() < deadline {
        let answer = socket
            .send(b"query")
            .map_err(|e| format!("send: {}", errno_name(&e)))
            .and_then(|_| socket.recv(&mut buf).map_err(|e| format!("recv: {e}")));
        match answer {
            Ok(n) => emit(&json!({
                "event": "answer",
                "from": String::from_utf8_lossy(&buf[..n]).trim().to_owned(),
            })),
            Err(e) => {
                emit(&json!({"event": "failed", "error": e}));
                socket = resolver_socket(connect)?;
            }
        }
        std::thread::sleep(Duration::from_millis(interval_ms));
    }
    Ok(())
}

/// Binds `[::]:port` (dual stack) for each port, answers with `name`; runs until killed.
fn serve_many(name: &str, tcp: &[u16], udp: &[u16]) -> Result<(), String> {
    let mut handles = Vec::new();
    for &port in tcp {
        let listener =
            TcpListener::bind(("::", port)).map_err(|e| format!("bind tcp {port}: {e}"))?;
        let name = name.to_owned();
        handles.push(thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                let name = name.clone();
                thread::spawn(move || {
                    let _ = s.write_all(name.as_bytes());
                    let _ = s.shutdown(Shutdown::Write);
                    let mut end = [0u8; 16];
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    let _ = s.read(&mut end);
                });
            }
        }));
    }
    for &port in udp {
        let socket = UdpSocket::bind(("::", port)).map_err(|e| format!("bind udp {port}: {e}"))?;
        let name = name.to_owned();
        handles.push(thread::spawn(move || {
            let mut buf = [0u8; 2048];
            loop {
                if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(name.as_bytes(), peer);
                }
            }
        }));
    }
    emit(&json!({"event": "listening", "tcp": tcp, "udp": udp}));
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

/// A TCP connection over IPv6 whose packets carry a destination options header of 520 bytes
/// (three options of a type to skip when unknown): past what weft's datapath parses, so its
/// packets reach the "unparsed" path. Needs CAP_NET_RAW.
fn connect_with_dstopts(addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd as _;
    let SocketAddr::V6(v6) = addr else {
        return Err(std::io::Error::other("an IPv6 address is needed"));
    };
    // Header: next header (filled by the kernel), length in 8-octet units after the first 8.
    let mut opts = vec![0u8, (520 / 8 - 1) as u8];
    for len in [255u8, 255, 2] {
        opts.extend([0x1e, len]);
        opts.extend(std::iter::repeat_n(0u8, usize::from(len)));
    }
    debug_assert_eq!(opts.len(), 520);
    // SAFETY: plain socket creation; the descriptor is owned by the stream below.
    let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_STREAM, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket this function owns from here on.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros() as i32),
    };
    let set = |level, name, ptr: *const libc::c_void, len: usize| {
        // SAFETY: a valid socket and an option buffer of `len` bytes.
        let ret = unsafe { libc::setsockopt(fd, level, name, ptr, len as libc::socklen_t) };
        if ret == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    set(
        libc::IPPROTO_IPV6,
        libc::IPV6_DSTOPTS,
        opts.as_ptr().cast(),
        opts.len(),
    )?;
    // connect() honours the send timeout.
    set(
        libc::SOL_SOCKET,
        libc::SO_SNDTIMEO,
        std::ptr::from_ref(&tv).cast(),
        size_of::<libc::timeval>(),
    )?;
    let (storage, len) = sockaddr(SocketAddr::V6(v6));
    // SAFETY: `storage` holds a sockaddr_in6 of `len` bytes.
    let ret = unsafe { libc::connect(fd, std::ptr::from_ref(&storage).cast(), len) };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

/// One probe: the peer's name, or `error: why`.
fn probe_one(target: &str, timeout: Duration) -> String {
    let Some((proto, addr)) = target.split_once(':') else {
        return format!("error: bad target {target:?}");
    };
    let Ok(addr) = addr.parse::<SocketAddr>() else {
        return format!("error: bad address {addr:?}");
    };
    let result = match proto {
        "tcp" | "tcp-dstopts" => (|| -> Result<String, String> {
            let mut s = if proto == "tcp" {
                TcpStream::connect_timeout(&addr, timeout)
            } else {
                connect_with_dstopts(addr, timeout)
            }
            .map_err(|e| format!("connect: {}", errno_name(&e)))?;
            s.set_read_timeout(Some(timeout))
                .map_err(|e| e.to_string())?;
            let mut name = String::new();
            s.read_to_string(&mut name)
                .map_err(|e| format!("read: {e}"))?;
            abort_on_close(&s)?;
            Ok(name)
        })(),
        "udp" => (|| -> Result<String, String> {
            let bind = if addr.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            };
            let s = UdpSocket::bind(bind).map_err(|e| format!("bind: {e}"))?;
            s.connect(addr)
                .map_err(|e| format!("connect: {}", errno_name(&e)))?;
            let deadline = Instant::now() + timeout;
            let mut buf = [0u8; 2048];
            // Resent every 250 ms until the deadline: a datagram may be lost.
            loop {
                s.send(b"probe")
                    .map_err(|e| format!("send: {}", errno_name(&e)))?;
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err("timeout".into());
                }
                s.set_read_timeout(Some(left.min(Duration::from_millis(250))))
                    .map_err(|e| e.to_string())?;
                match s.recv(&mut buf) {
                    Ok(n) => return Ok(String::from_utf8_lossy(&buf[..n]).into_owned()),
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => return Err(format!("recv: {}", errno_name(&e))),
                }
            }
        })(),
        other => Err(format!("unknown protocol {other:?}")),
    };
    result.unwrap_or_else(|e| format!("error: {e}"))
}

fn probe(timeout: Duration, targets: &[String]) -> Result<(), String> {
    let handles: Vec<_> = targets
        .iter()
        .map(|t| {
            let t = t.clone();
            thread::spawn(move || {
                let r = probe_one(&t, timeout);
                (t, r)
            })
        })
        .collect();
    let results: serde_json::Map<String, serde_json::Value> = handles
        .into_iter()
        .filter_map(|h| h.join().ok())
        .map(|(t, r)| (t, serde_json::Value::String(r)))
        .collect();
    emit(&json!({"event": "probe", "results": results}));
    Ok(())
}
