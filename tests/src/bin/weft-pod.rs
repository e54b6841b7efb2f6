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

#[derive(Debug, Parser)]
#[command(name = "weft-pod", about = "Test workload for weft's simulated pods")]
struct Cli {
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
    /// Open and close TCP connections as fast as possible for --seconds; report the rate.
    Churn {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        seconds: f64,
    },
    /// Echo UDP datagrams back to their sender.
    UdpEcho {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Send --count datagrams of --size bytes and wait for each echo.
    UdpClient {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u64,
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("{}", json!({"event": "error", "error": e}));
            ExitCode::FAILURE
        }
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
        } => tcp_server(listen, reply, read, connections, close_at_once),
        Cmd::TcpClient {
            connect,
            send,
            expect,
            close,
        } => tcp_client(connect, send, expect, close),
        Cmd::Churn { connect, seconds } => churn(connect, seconds),
        Cmd::UdpEcho { listen } => udp_echo(listen),
        Cmd::UdpClient {
            connect,
            count,
            size,
        } => udp_client(connect, count, size),
    }
}

fn tcp_server(
    listen: SocketAddr,
    reply: u64,
    read: Option<u64>,
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
        handles.push(thread::spawn(move || {
            let result = serve(stream, reply, read);
            match result {
                Ok((local, received, sent)) => emit(&json!({
                    "event": "served", "peer": peer.to_string(), "local": local,
                    "received": received, "sent": sent,
                })),
                Err(e) => emit(&json!({"event": "error", "peer": peer.to_string(), "error": e})),
            }
        }));
    }
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

/// Serves one connection; returns (local address, bytes received, bytes sent).
fn serve(
    mut stream: TcpStream,
    reply: u64,
    read: Option<u64>,
) -> Result<(String, u64, u64), String> {
    let local = stream.local_addr().map_err(|e| e.to_string())?.to_string();
    match read {
        None => {
            let received = drain(&mut stream)?;
            let sent = write_bytes(&mut stream, reply)?;
            Ok((local, received, sent))
        }
        Some(n) => {
            let got = read_exactly(&mut stream, n)?;
            let sent = write_bytes(&mut stream, reply)?;
            // Wait for the peer's FIN so the peer closes first.
            Ok((local, got + drain(&mut stream)?, sent))
        }
    }
}

/// Reads up to `n` bytes (fewer only at EOF).
fn read_exactly(stream: &mut TcpStream, n: u64) -> Result<u64, String> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    while total < n {
        let want = (n - total).min(buf.len() as u64) as usize;
        match stream.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(got) => total += got as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    Ok(total)
}

fn drain(stream: &mut TcpStream) -> Result<u64, String> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

/// Writes `n` bytes; returns how many the socket accepted (what the caller reports).
fn write_bytes(stream: &mut TcpStream, n: u64) -> Result<u64, String> {
    let buf = vec![0x5au8; 64 * 1024];
    let mut written = 0u64;
    while written < n {
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
    let sent = write_bytes(&mut stream, send)?;
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

fn churn(connect: SocketAddr, seconds: f64) -> Result<(), String> {
    let start = Instant::now();
    let limit = Duration::from_secs_f64(seconds);
    let mut connections = 0u64;
    let mut errors = 0u64;
    let mut buf = [0u8; 16];
    while start.elapsed() < limit {
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

fn udp_echo(listen: SocketAddr) -> Result<(), String> {
    let socket = UdpSocket::bind(listen).map_err(|e| format!("bind {listen}: {e}"))?;
    emit(
        &json!({"event": "listening", "addr": socket.local_addr().map_err(|e| e.to_string())?.to_string()}),
    );
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, peer) = socket
            .recv_from(&mut buf)
            .map_err(|e| format!("recv: {e}"))?;
        socket
            .send_to(&buf[..n], peer)
            .map_err(|e| format!("send: {e}"))?;
    }
}

fn udp_client(connect: SocketAddr, count: u64, size: usize) -> Result<(), String> {
    let bind: SocketAddr = if connect.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .map_err(|e| format!("{e}"))?;
    let socket = UdpSocket::bind(bind).map_err(|e| format!("bind: {e}"))?;
    socket
        .connect(connect)
        .map_err(|e| format!("connect {connect}: {e}"))?;
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let payload = vec![0xa5u8; size];
    let mut buf = vec![0u8; 65_536];
    let mut echoed = 0u64;
    for _ in 0..count {
        socket.send(&payload).map_err(|e| format!("send: {e}"))?;
        let n = socket.recv(&mut buf).map_err(|e| format!("recv: {e}"))?;
        if n == size {
            echoed += 1;
        }
    }
    emit(&json!({
        "event": "done", "local": socket.local_addr().map_err(|e| e.to_string())?.to_string(),
        "remote": connect.to_string(), "sent": count, "echoed": echoed,
    }));
    if echoed == count {
        Ok(())
    } else {
        Err(format!("{echoed} of {count} echoed"))
    }
}
