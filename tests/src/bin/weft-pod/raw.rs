//! Raw IPv4 packets, as a workload with CAP_NET_RAW can craft them: what a policy bypass
//! through ICMP or fragments would use.
use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use serde_json::json;

use super::emit;

/// The internet checksum (RFC 1071).
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP message of `icmp_type` with identifier `id` and `data`, checksummed.
pub fn icmp(icmp_type: u8, id: u16, data: &[u8]) -> Vec<u8> {
    let mut m = vec![icmp_type, 0, 0, 0];
    m.extend(id.to_be_bytes());
    m.extend(1u16.to_be_bytes());
    m.extend(data);
    let c = checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

fn raw_socket(protocol: i32) -> Result<std::os::fd::OwnedFd, String> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, protocol) };
    if fd < 0 {
        return Err(format!("raw socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor this function owns.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    }
}

/// Sends `payload` of IP protocol `protocol` to `to` with a header of our own (IP_HDRINCL),
/// as one packet or split in two fragments at `split` bytes (a multiple of 8).
pub fn send(
    to: Ipv4Addr,
    protocol: u8,
    payload: &[u8],
    split: Option<usize>,
) -> Result<(), String> {
    let fd = raw_socket(libc::IPPROTO_RAW)?;
    let pieces: Vec<(usize, &[u8], bool)> = match split {
        Some(at) if at < payload.len() => {
            vec![(0, &payload[..at], true), (at, &payload[at..], false)]
        }
        _ => vec![(0, payload, false)],
    };
    for (offset, piece, more) in pieces {
        let fragment = Fragment {
            offset: u16::try_from(offset / 8).map_err(|_| "offset too large")?,
            more,
        };
        // Source 0: the kernel fills it in.
        let packet = ipv4(Ipv4Addr::UNSPECIFIED, to, protocol, fragment, piece)?;
        let error = send_to(&fd, &packet, to).err();
        emit(&json!({"event": "sent", "offset": offset, "bytes": piece.len(), "error": error}));
    }
    Ok(())
}

/// Where an IPv4 packet sits in its datagram.
#[derive(Clone, Copy, Default)]
struct Fragment {
    /// In units of 8 bytes.
    offset: u16,
    more: bool,
}

/// An IPv4 packet (20-byte header, checksum left to the kernel).
fn ipv4(
    src: Ipv4Addr,
    to: Ipv4Addr,
    protocol: u8,
    fragment: Fragment,
    payload: &[u8],
) -> Result<Vec<u8>, String> {
    let len = u16::try_from(20 + payload.len()).map_err(|_| "payload too long")?;
    let frag = fragment.offset | if fragment.more { 0x2000 } else { 0 };
    let mut packet = vec![0x45, 0];
    packet.extend(len.to_be_bytes());
    packet.extend([0x12, 0x34]);
    packet.extend(frag.to_be_bytes());
    packet.extend([64, protocol, 0, 0]);
    packet.extend(src.octets());
    packet.extend(to.octets());
    packet.extend(payload);
    Ok(packet)
}

/// sendto(2) of `bytes` to `to` on a raw socket.
fn send_to(fd: &std::os::fd::OwnedFd, bytes: &[u8], to: Ipv4Addr) -> Result<(), String> {
    use std::os::fd::AsRawFd as _;
    let addr = sockaddr(to);
    // SAFETY: `bytes` and `addr` outlive the call; lengths are theirs.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            0,
            std::ptr::from_ref(&addr).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    Ok(())
}

/// SO_RCVTIMEO: a receive waits at most `micros`.
fn set_timeout(fd: &std::os::fd::OwnedFd, micros: i64) {
    use std::os::fd::AsRawFd as _;
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: micros,
    };
    // SAFETY: `timeout` outlives the call and has the size passed.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::from_ref(&timeout).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
}

/// Receives on a raw socket of `protocol` for `wait`: how many datagrams contained `marker`.
pub fn receive(protocol: i32, marker: &[u8], wait: Duration) -> Result<(), String> {
    use std::os::fd::AsRawFd as _;
    let fd = raw_socket(protocol)?;
    set_timeout(&fd, 100_000);
    emit(&json!({"event": "listening", "protocol": protocol}));
    let deadline = Instant::now() + wait;
    let (mut marked, mut other) = (0u64, 0u64);
    let mut buf = [0u8; 65_536];
    while Instant::now() < deadline {
        // SAFETY: `buf` is writable for its whole length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let Ok(n) = usize::try_from(n) else { continue };
        if buf[..n].windows(marker.len()).any(|w| w == marker) {
            marked += 1;
        } else {
            other += 1;
        }
    }
    emit(&json!({"event": "received", "marked": marked, "other": other}));
    Ok(())
}

/// Pings `to` from one raw ICMP socket (as iputils' ping does): sends echo requests carrying
/// `data` for `wait`, and counts the replies that carry it.
pub fn ping(to: Ipv4Addr, data: &[u8], wait: Duration) -> Result<(), String> {
    use std::os::fd::AsRawFd as _;
    let fd = raw_socket(libc::IPPROTO_ICMP)?;
    set_timeout(&fd, 200_000);
    let request = icmp(8, 7, data);
    let deadline = Instant::now() + wait;
    let mut replies = 0u64;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        // A refused request shows as no reply.
        let _ = send_to(&fd, &request, to);
        // SAFETY: `buf` is writable for its whole length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let Ok(n) = usize::try_from(n) else { continue };
        // A raw socket sees the IP header (20 bytes here), then the ICMP type.
        if n > 20 && buf[20] == 0 && buf[..n].windows(data.len()).any(|w| w == data) {
            replies += 1;
        }
    }
    emit(&json!({"event": "ping", "replies": replies}));
    Ok(())
}

/// The reply-path trick: an unconnected UDP socket on `port` receives a datagram forged to
/// come from `peer` (sent to our own address through a raw socket), then sends `data` to
/// `peer`, which policy alone would judge. Prints what each step got.
pub fn forge_reply_path(
    own: Ipv4Addr,
    port: u16,
    peer: std::net::SocketAddrV4,
    data: &[u8],
) -> Result<(), String> {
    let socket = std::net::UdpSocket::bind((own, port)).map_err(|e| format!("bind: {e}"))?;
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(|e| e.to_string())?;
    let mut udp = Vec::new();
    udp.extend(peer.port().to_be_bytes());
    udp.extend(port.to_be_bytes());
    udp.extend(u16::try_from(8 + 5).map_err(|_| "len")?.to_be_bytes());
    udp.extend([0u8, 0]); // no checksum (IPv4 allows it)
    udp.extend(b"forge");
    // Refused at once when the hook drops it (EPERM): then nothing is planted.
    let forged = send_from(*peer.ip(), own, 17, &udp);
    let mut buf = [0u8; 64];
    let planted = forged.is_ok() && socket.recv_from(&mut buf).is_ok();
    let sent = socket.send_to(data, peer).map_err(|e| e.to_string());
    emit(&json!({
        "event": "forged",
        "forge_error": forged.err(),
        "planted": planted,
        "sent": sent.is_ok(),
        "error": sent.err(),
    }));
    Ok(())
}

/// One IPv4 packet with a chosen source address (IP_HDRINCL).
fn send_from(src: Ipv4Addr, to: Ipv4Addr, protocol: u8, payload: &[u8]) -> Result<(), String> {
    let fd = raw_socket(libc::IPPROTO_RAW)?;
    let packet = ipv4(src, to, protocol, Fragment::default(), payload)?;
    send_to(&fd, &packet, to).map_err(|e| format!("raw send: {e}"))
}

/// Every frame on interface `iface` for `wait` (an AF_PACKET socket, as tcpdump opens):
/// counts frames carrying `needle`, and TCP frames to or from `port` (IPv4 and IPv6).
pub fn capture(iface: &str, needle: &[u8], port: u16, wait: Duration) -> Result<(), String> {
    use std::os::fd::AsRawFd as _;
    let name = std::ffi::CString::new(iface).map_err(|e| e.to_string())?;
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(format!("{iface}: {}", std::io::Error::last_os_error()));
    }
    let all = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(all)) };
    if fd < 0 {
        return Err(format!(
            "packet socket: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `fd` is a fresh descriptor this function owns.
    let fd: std::os::fd::OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = all;
    sll.sll_ifindex = index as i32;
    // SAFETY: `sll` is a valid sockaddr_ll of the size passed.
    let bound = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::from_ref(&sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if bound != 0 {
        return Err(format!("bind {iface}: {}", std::io::Error::last_os_error()));
    }
    set_timeout(&fd, 100_000);
    emit(&json!({"event": "listening", "iface": iface}));
    let deadline = Instant::now() + wait;
    let (mut frames, mut found, mut on_port) = (0u64, 0u64, 0u64);
    let mut buf = [0u8; 65_536];
    while Instant::now() < deadline {
        // SAFETY: `buf` is writable for its whole length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let Ok(n) = usize::try_from(n) else { continue };
        let frame = &buf[..n];
        frames += 1;
        if frame.windows(needle.len()).any(|w| w == needle) {
            found += 1;
        }
        if tcp_ports(frame).is_some_and(|(s, d)| s == port || d == port) {
            on_port += 1;
        }
    }
    emit(&json!({"event": "captured", "frames": frames, "found": found, "port_frames": on_port}));
    Ok(())
}

/// The TCP ports of an Ethernet frame (IPv4 without options beyond its IHL, or IPv6 without
/// extension headers).
fn tcp_ports(frame: &[u8]) -> Option<(u16, u16)> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let (proto, l4) = match ethertype {
        0x0800 => (
            *frame.get(14 + 9)?,
            14 + usize::from(frame.get(14)? & 0x0f) * 4,
        ),
        0x86dd => (*frame.get(14 + 6)?, 14 + 40),
        _ => return None,
    };
    if proto != 6 {
        return None;
    }
    let port = |at: usize| Some(u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]));
    Some((port(l4)?, port(l4 + 2)?))
}
