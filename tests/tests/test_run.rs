//! BPF_PROG_TEST_RUN on the real kernel object: the cgroup_skb programs classify packets and
//! account them per cgroup, direction and protocol, and never drop.
use std::path::Path;

use aya::{
    Ebpf, EbpfLoader,
    maps::{PerCpuArray, PerCpuHashMap},
    programs::{CgroupSkb, TestRun, TestRunOptions},
};
use weft_abi::{
    net::Direction,
    stats::Counter,
    traffic::{TrafficKey, TrafficValue},
};

const EGRESS: &str = "weft_skb_egress";
const INGRESS: &str = "weft_skb_ingress";

/// The cgroup2 mount and this test process's cgroup v2 directory in it.
fn own_cgroup_dir() -> (std::path::PathBuf, std::path::PathBuf) {
    let mount =
        weft::cgroup::find_cgroup2_mount(Path::new("/proc/self/mountinfo")).expect("cgroup2 mount");
    let text = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line in /proc/self/cgroup");
    let own = mount.join(rel.trim_start_matches('/'));
    (mount, own)
}

/// The cgroup v2 id of this test process (test-run skbs belong to a socket of the caller).
fn own_cgroup_id() -> u64 {
    weft::cgroup::cgroup_id(&own_cgroup_dir().1).expect("cgroup id")
}

fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    p.extend_from_slice(&ethertype.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

fn ipv4(protocol: u8, l4_len: usize) -> Vec<u8> {
    let total = 20 + l4_len;
    let mut h = vec![
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        0,
        0x40,
        0,
        64,
        protocol,
        0,
        0,
    ];
    h.extend_from_slice(&[10, 0, 0, 11, 10, 0, 0, 12]);
    h.resize(total, 0);
    h
}

/// IPv6 with a hop-by-hop options header and a fragment header before UDP.
fn ipv6_udp_with_extension_headers(l4_len: usize) -> Vec<u8> {
    let payload = 8 + 8 + l4_len;
    let mut h = vec![
        0x60,
        0,
        0,
        0,
        (payload >> 8) as u8,
        payload as u8,
        0, /* hop-by-hop */
        64,
    ];
    h.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0b]);
    h.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0c]);
    h.extend_from_slice(&[44 /* fragment */, 0, 1, 4, 0, 0, 0, 0]);
    h.extend_from_slice(&[17 /* udp */, 0, 0, 0, 0, 0, 0, 1]);
    h.resize(40 + payload, 0);
    h
}

/// IPv6 followed by `n` destination-options headers of 8 bytes each, then 20 bytes of
/// protocol `last`.
fn ipv6_with_options_chain(n: usize, last: u8) -> Vec<u8> {
    let payload = 8 * n + 20;
    let mut h = vec![0x60, 0, 0, 0, (payload >> 8) as u8, payload as u8, 60, 64];
    h.extend_from_slice(&[0; 32]);
    for i in 0..n {
        let next = if i + 1 == n { last } else { 60 };
        h.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
    }
    h.resize(40 + payload, 0);
    h
}

/// A `struct __sk_buff` for ctx_in with only `gso_segs` (offset 164) set.
fn skb_ctx_with_gso_segs(segs: u32) -> Vec<u8> {
    let mut ctx = vec![0u8; 192];
    ctx[164..168].copy_from_slice(&segs.to_ne_bytes());
    ctx
}

/// Runs a program on a packet `repeat` times; it must let the packet through.
fn run(ebpf: &Ebpf, name: &str, packet: &[u8], repeat: u32, ctx: Option<&[u8]>) {
    let prog: &CgroupSkb = ebpf
        .program(name)
        .expect(name)
        .try_into()
        .expect("cgroup_skb");
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(packet);
    opts.ctx_in = ctx;
    opts.repeat = repeat;
    let r = prog
        .test_run(opts)
        .unwrap_or_else(|e| panic!("test_run {name} {packet:?}: {e:?}"));
    assert_eq!(r.return_value, 1, "{name} must never drop");
}

#[test]
fn cgroup_skb_programs_account_packets_by_protocol_and_never_drop() {
    let mut ebpf = EbpfLoader::new()
        .load(weft::datapath::OBJECT)
        .expect("load the embedded object");
    for name in [EGRESS, INGRESS] {
        let prog: &mut CgroupSkb = ebpf
            .program_mut(name)
            .expect(name)
            .try_into()
            .expect("cgroup_skb");
        prog.load().unwrap_or_else(|e| panic!("load {name}: {e}"));
    }
    run(&ebpf, EGRESS, &eth(0x0800, &ipv4(6, 20)), 3, None);
    run(
        &ebpf,
        EGRESS,
        &eth(0x86dd, &ipv6_udp_with_extension_headers(8)),
        2,
        None,
    );
    run(&ebpf, INGRESS, &eth(0x0800, &ipv4(17, 8)), 5, None);
    run(
        &ebpf,
        INGRESS,
        &eth(0x86dd, &ipv6_udp_with_extension_headers(100)),
        1,
        None,
    );
    // Six extension headers is the most the program walks.
    run(
        &ebpf,
        INGRESS,
        &eth(0x86dd, &ipv6_with_options_chain(6, 17)),
        1,
        None,
    );
    // TCP is classified but accounted by sock_ops, not here (and it is not unparsed).
    run(
        &ebpf,
        EGRESS,
        &eth(0x86dd, &ipv6_with_options_chain(2, 6)),
        1,
        None,
    );
    // A GRO skb standing for 4 wire packets; its 28 bytes are what the socket layer sees.
    run(
        &ebpf,
        INGRESS,
        &eth(0x0800, &ipv4(17, 8)),
        1,
        Some(&skb_ctx_with_gso_segs(4)),
    );

    let unparsable: [(&str, Vec<u8>); 4] = [
        (EGRESS, eth(0x0806, &[0u8; 28])),                            // ARP
        (INGRESS, eth(0x0800, &ipv6_udp_with_extension_headers(8))),  // v6 bytes, v4 type
        (EGRESS, eth(0x86dd, &ipv6_with_options_chain(7, 6))),        // longer than any real chain
        (INGRESS, eth(0x86dd, &ipv6_with_options_chain(1, 6)[..41])), // extension header cut short
    ];
    for (name, packet) in &unparsable {
        run(&ebpf, name, packet, 1, None);
    }

    let traffic: PerCpuHashMap<_, TrafficKey, TrafficValue> =
        PerCpuHashMap::try_from(ebpf.map("TRAFFIC").expect("TRAFFIC")).expect("per-cpu hash");
    let mut seen: Vec<(TrafficKey, u64, u64)> = traffic
        .iter()
        .map(|e| {
            let (k, v) = e.expect("read TRAFFIC");
            (
                k,
                v.iter().map(|x| x.packets).sum(),
                v.iter().map(|x| x.bytes).sum(),
            )
        })
        .collect();
    seen.sort();
    let cgroup_id = own_cgroup_id();
    let key = |direction: Direction, ip_version: u8, protocol: u8| TrafficKey {
        cgroup_id,
        direction: direction as u8,
        ip_version,
        protocol,
        _pad: [0; 5],
    };
    // The Ethernet header is not part of what cgroup_skb sees: bytes count from the IP header.
    // TCP (the three IPv4 packets and the IPv6 chain on egress) is not accounted here.
    let mut expected = vec![
        (key(Direction::Ingress, 4, 17), 5 + 4, 5 * 28 + 28),
        (
            key(Direction::Ingress, 6, 17),
            2,
            (40 + 16 + 100) + (40 + 6 * 8 + 20),
        ),
        (key(Direction::Egress, 6, 17), 2, 2 * (40 + 16 + 8)),
    ];
    expected.sort();
    assert_eq!(seen, expected);

    let stats: PerCpuArray<_, u64> =
        PerCpuArray::try_from(ebpf.map("STATS").expect("STATS")).expect("per-cpu array");
    let unparsed: u64 = stats
        .get(&(Counter::PacketsUnparsed as u32), 0)
        .expect("read STATS")
        .iter()
        .sum();
    assert_eq!(
        unparsed,
        unparsable.len() as u64,
        "every unparsable packet is counted"
    );
}

/// The level probe agrees with counting directories where the agent sees the real root, for
/// its own cgroup and for a cgroup outside its ancestry.
#[test]
fn the_level_probe_agrees_with_the_directory_count_outside_a_cgroup_namespace() {
    let (mount, own) = own_cgroup_dir();
    #[derive(clap::Parser)]
    struct Defaults {
        #[command(flatten)]
        caps: weft::datapath::Capacities,
    }
    let caps = <Defaults as clap::Parser>::parse_from(["defaults"]).caps;
    for dir in [own.as_path(), mount.as_path()] {
        assert_eq!(
            weft::datapath::cgroup_level(dir, &caps).expect("probe").0,
            weft::cgroup::level(dir).expect("count"),
            "{}",
            dir.display()
        );
    }
    // The agent's own cgroup is named only when it is below the attach cgroup.
    assert_eq!(
        weft::datapath::cgroup_level(&own, &caps).expect("probe").1,
        None
    );
    let own_level = weft::cgroup::level(&own).expect("count");
    let below_mount = (own_level > 0).then(|| {
        use std::os::unix::fs::MetadataExt as _;
        (own_level, std::fs::metadata(&own).expect("stat").ino())
    });
    assert_eq!(
        weft::datapath::cgroup_level(&mount, &caps)
            .expect("probe")
            .1,
        below_mount
    );
}
