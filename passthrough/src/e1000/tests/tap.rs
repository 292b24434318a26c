//! The NIC on a TAP device in a network namespace of the test's own, answered by the host
//! kernel: ARP and ICMP echo, every byte of the echo checked. No traffic leaves the
//! namespace (it has only its loopback and the TAP, and no route anywhere else). A test
//! environment without TAP devices or network namespaces fails this test: it is not skipped.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::e1000::testdriver::{TestNic, MAC_A, RCTL_DEFAULT};
use crate::net::{TapWire, MAX_FRAME};

const TAP: &str = "ddvm-e1000-t0";
const HOST_IP: [u8; 4] = [10, 213, 0, 1];
const OUR_IP: [u8; 4] = [10, 213, 0, 2];

/// Moves the calling thread into a new, empty network namespace.
fn private_netns() {
    // SAFETY: unshare takes no pointers; CLONE_NEWNET affects only the calling thread's
    // network namespace, which no other thread of the test process relies on.
    let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        r,
        0,
        "unshare(CLONE_NEWNET) failed ({}): the TAP test needs root and network namespaces",
        std::io::Error::last_os_error()
    );
}

/// Runs `ip ARGS` in the calling thread's namespace (a child inherits it).
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip` (Debian: iproute2): {e}"));
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

fn arp_request() -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0xFF; 6]);
    f.extend_from_slice(&MAC_A);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&MAC_A);
    f.extend_from_slice(&OUR_IP);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&HOST_IP);
    f
}

fn echo_request(host_mac: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1];
    icmp.extend_from_slice(payload);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut ipv4 = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 1, 0, 0];
    ipv4[2..4].copy_from_slice(&total.to_be_bytes());
    ipv4.extend_from_slice(&OUR_IP);
    ipv4.extend_from_slice(&HOST_IP);
    let c = checksum(&ipv4);
    ipv4[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::new();
    f.extend_from_slice(&host_mac);
    f.extend_from_slice(&MAC_A);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&ipv4);
    f.extend_from_slice(&icmp);
    f
}

/// Frames received until `pick` accepts one (others, such as the kernel's IPv6 chatter, are
/// skipped), for at most 5 s.
fn recv_matching(t: &mut TestNic, mut pick: impl FnMut(&[u8]) -> bool) -> Vec<u8> {
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no answer from the kernel"
        );
        match t.try_recv() {
            Some(f) if pick(&f) => return f,
            Some(_) => {}
            None => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

fn body() {
    private_netns();
    let wire = TapWire::open(TAP, MAX_FRAME)
        .unwrap_or_else(|e| panic!("the TAP test cannot open a TAP device: {e}"));
    assert_eq!(wire.name(), TAP);
    ip(&["link", "set", "lo", "up"]);
    ip(&["addr", "add", "10.213.0.1/24", "dev", TAP]);
    ip(&["link", "set", TAP, "up"]);
    let mut t = TestNic::on(MAC_A, Box::new(wire), true);
    t.init(RCTL_DEFAULT);

    t.send(&arp_request());
    let reply = recv_matching(&mut t, |f| f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2]);
    assert_eq!(reply[..6], MAC_A, "to us");
    let host_mac: [u8; 6] = reply[22..28].try_into().unwrap();
    assert_eq!(reply[28..32], HOST_IP, "sender IP");
    assert_eq!(reply[32..38], MAC_A, "target MAC");
    assert_eq!(reply[38..42], OUR_IP, "target IP");

    for (n, len) in [(1u8, 56usize), (2, 1000), (3, 1472)] {
        let payload: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(n) ^ n).collect();
        t.send(&echo_request(host_mac, &payload));
        let r = recv_matching(&mut t, |f| f[12..14] == [0x08, 0x00] && f[23] == 1);
        assert_eq!(r[..6], MAC_A);
        assert_eq!(r[6..12], host_mac);
        assert_eq!(r[26..30], HOST_IP);
        assert_eq!(r[30..34], OUR_IP);
        let icmp = &r[34..34 + 8 + len];
        assert_eq!(icmp[0], 0, "echo reply");
        assert_eq!(icmp[4..8], [0x12, 0x34, 0, 1], "identifier and sequence");
        assert_eq!(icmp[8..], payload[..], "the payload came back whole");
        assert_eq!(checksum(icmp), 0);
    }
    let s = t.nic.stats();
    assert_eq!((s.frames_sent, s.tx_dropped, s.dma_refused), (4, 0, 0));
}

#[test]
fn through_a_tap_in_a_private_namespace_the_kernel_answers_arp_and_ping() {
    // Its own thread: the namespace is the thread's, and goes with it.
    std::thread::spawn(body)
        .join()
        .expect("the TAP test failed");
}
