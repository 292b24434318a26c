//! Tests of the wires (the TAP wire is tested with a NIC model on it, in `e1000::tests::tap`).

use std::io::{Read, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::*;

/// A frame of `len` bytes numbered `n`: every byte depends on both.
pub(crate) fn frame(n: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(n.wrapping_mul(7)) as u8)
        .collect()
}

fn recv_one(w: &mut dyn Wire) -> Option<Vec<u8>> {
    let mut buf = vec![0; w.max_frame()];
    w.recv(&mut buf).unwrap().map(|n| buf[..n].to_vec())
}

/// Receives until `want` frames arrived or `timeout` passed, sleeping on the wire's fd.
fn recv_all(w: &mut dyn Wire, want: usize, timeout: Duration) -> Vec<Vec<u8>> {
    let start = Instant::now();
    let mut got = Vec::new();
    while got.len() < want && start.elapsed() < timeout {
        match recv_one(w) {
            Some(f) => got.push(f),
            None => {
                poll_readable(&[w.fd()], 10);
            }
        }
    }
    got
}

fn readable(w: &dyn Wire) -> bool {
    poll_readable(&[w.fd()], 0)[0]
}

/// A fresh path for a socket in the temporary directory.
fn socket_path(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let p = std::env::temp_dir().join(format!(
        "ddvm-wire-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&p);
    p
}

#[test]
fn a_pair_carries_frames_both_ways_in_order_and_its_fd_says_when() {
    let (mut a, mut b) = wire_pair(PairConfig::default()).unwrap();
    assert!(!readable(&b), "nothing sent, nothing readable");
    for n in 0..10 {
        a.send(&frame(n, 60 + n as usize)).unwrap();
    }
    b.send(&frame(99, MAX_FRAME)).unwrap();
    assert!(readable(&b) && readable(&a));
    let got = recv_all(&mut b, 10, Duration::from_secs(1));
    assert_eq!(
        got,
        (0..10)
            .map(|n| frame(n, 60 + n as usize))
            .collect::<Vec<_>>()
    );
    assert!(recv_one(&mut b).is_none());
    assert!(!readable(&b), "drained: not readable");
    assert_eq!(recv_one(&mut a), Some(frame(99, MAX_FRAME)));
    assert_eq!(a.stats().sent, 10);
    assert_eq!(b.stats().received, 10);
}

#[test]
fn a_pair_refuses_frames_of_the_wrong_size() {
    let (mut a, _b) = wire_pair(PairConfig::default()).unwrap();
    assert!(matches!(
        a.send(&[0; 13]),
        Err(WireError::FrameSize { len: 13, .. })
    ));
    assert!(matches!(
        a.send(&vec![0; MAX_FRAME + 1]),
        Err(WireError::FrameSize { .. })
    ));
    assert!(matches!(
        a.recv(&mut [0; 100]),
        Err(WireError::BufferTooSmall { .. })
    ));
}

#[test]
fn a_pair_drops_and_duplicates_every_nth_frame() {
    let cfg = PairConfig {
        drop: Every::Nth(3),
        duplicate: Every::Nth(4),
        ..PairConfig::default()
    };
    let (mut a, mut b) = wire_pair(cfg).unwrap();
    for n in 1..=12 {
        a.send(&frame(n, 64)).unwrap();
    }
    let got = recv_all(&mut b, 100, Duration::from_millis(50));
    // 3, 6, 9, 12 dropped (12 is both: dropped, not duplicated); 4 and 8 twice.
    let want: Vec<u32> = vec![1, 2, 4, 4, 5, 7, 8, 8, 10, 11];
    assert_eq!(got, want.iter().map(|&n| frame(n, 64)).collect::<Vec<_>>());
    assert_eq!(a.stats().send_dropped, 4);
}

#[test]
fn a_pair_with_a_probability_is_repeatable_for_a_seed() {
    let run = |seed| {
        let cfg = PairConfig {
            drop: Every::Probability(0.3),
            seed,
            ..PairConfig::default()
        };
        let (mut a, mut b) = wire_pair(cfg).unwrap();
        for n in 0..200 {
            a.send(&frame(n, 64)).unwrap();
        }
        // Without a delay every frame that survived is queued by the time `send` returns:
        // take them until none is left (a deadline would cut a run short on a loaded host).
        let mut got = Vec::new();
        while let Some(f) = recv_one(&mut b) {
            got.push(f);
        }
        got
    };
    let first = run(7);
    assert_eq!(first, run(7));
    assert_ne!(first, run(8));
    assert!((100..180).contains(&first.len()), "{} of 200", first.len());
}

#[test]
fn a_pair_delays_frames_and_sleeps_until_they_are_due() {
    let delay = Duration::from_millis(30);
    let (mut a, mut b) = wire_pair(PairConfig {
        delay,
        ..PairConfig::default()
    })
    .unwrap();
    let start = Instant::now();
    a.send(&frame(1, 64)).unwrap();
    assert!(recv_one(&mut b).is_none(), "not due yet");
    assert!(!readable(&b));
    assert!(poll_readable(&[b.fd()], 1000)[0]);
    assert!(start.elapsed() >= delay);
    assert_eq!(recv_one(&mut b), Some(frame(1, 64)));
}

#[test]
fn a_full_pair_drops_instead_of_blocking_and_a_gone_end_loses_frames() {
    let (mut a, b) = wire_pair(PairConfig {
        capacity: 4,
        ..PairConfig::default()
    })
    .unwrap();
    for n in 0..6 {
        a.send(&frame(n, 64)).unwrap();
    }
    assert_eq!(b.queued(), 4);
    assert_eq!(a.stats().send_dropped, 2);
    drop(b);
    a.send(&frame(9, 64)).unwrap();
    assert_eq!(a.stats().send_dropped, 3);
}

#[test]
fn the_stream_wire_reassembles_frames_from_split_reads() {
    let (ours, mut peer) = UnixStream::pair().unwrap();
    let mut w = StreamWire::new(ours, MAX_FRAME, "socketpair".into()).unwrap();
    // Two frames written a few bytes at a time, the second's header split across writes.
    let mut bytes = Vec::new();
    for (n, len) in [(1, 100), (2, MAX_FRAME)] {
        bytes.extend_from_slice(&(len as u32).to_be_bytes());
        bytes.extend_from_slice(&frame(n, len));
    }
    let mut got = Vec::new();
    for chunk in bytes.chunks(3) {
        peer.write_all(chunk).unwrap();
        if let Some(f) = recv_one(&mut w) {
            got.push(f);
        }
    }
    assert_eq!(got, vec![frame(1, 100), frame(2, MAX_FRAME)]);
    assert!(recv_one(&mut w).is_none());
    // And out: our frames carry the length before them.
    w.send(&frame(3, 64)).unwrap();
    let mut out = [0u8; 68];
    peer.read_exact(&mut out).unwrap();
    assert_eq!(out[..4], 64u32.to_be_bytes());
    assert_eq!(out[4..], frame(3, 64)[..]);
}

#[test]
fn the_stream_wire_closes_on_an_oversized_length_and_drops_runts() {
    let (ours, mut peer) = UnixStream::pair().unwrap();
    let mut w = StreamWire::new(ours, MAX_FRAME, "socketpair".into()).unwrap();
    peer.write_all(&5u32.to_be_bytes()).unwrap();
    peer.write_all(&[1, 2, 3, 4, 5]).unwrap();
    peer.write_all(&(MAX_FRAME as u32 + 1).to_be_bytes())
        .unwrap();
    peer.write_all(&[0; 64]).unwrap();
    let mut buf = vec![0; MAX_FRAME];
    let err = w.recv(&mut buf).unwrap_err();
    assert!(
        matches!(&err, WireError::Closed { reason } if reason.contains("1523")),
        "{err}"
    );
    assert_eq!(w.stats().recv_dropped, 1, "the 5-byte frame");
    assert!(matches!(
        w.send(&frame(1, 64)),
        Err(WireError::Closed { .. })
    ));
    assert!(matches!(w.recv(&mut buf), Err(WireError::Closed { .. })));
    // The peer sees the connection end.
    let mut rest = Vec::new();
    peer.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    assert_eq!(peer.read_to_end(&mut rest).unwrap(), 0);
}

#[test]
fn the_stream_wire_closes_when_the_peer_does() {
    let (ours, peer) = UnixStream::pair().unwrap();
    let mut w = StreamWire::new(ours, MAX_FRAME, "socketpair".into()).unwrap();
    assert!(recv_one(&mut w).is_none());
    drop(peer);
    assert!(readable(&w), "EOF polls readable");
    assert!(matches!(
        w.recv(&mut vec![0; MAX_FRAME]),
        Err(WireError::Closed { .. })
    ));
    assert!(w.closed().is_some());
}

#[test]
fn the_stream_wire_drops_whole_frames_when_the_socket_is_full() {
    let (ours, mut peer) = UnixStream::pair().unwrap();
    let mut w = StreamWire::new(ours, MAX_FRAME, "socketpair".into()).unwrap();
    let total = 4000u32;
    for n in 0..total {
        w.send(&frame(n, 1000)).unwrap();
    }
    let dropped = w.stats().send_dropped;
    assert!(dropped > 0, "the peer read nothing: something must drop");
    // The peer reads frame after frame: each is whole, in order, with gaps only where
    // frames were dropped.
    drop(w); // what was still in the backlog is lost with the wire
    let mut bytes = Vec::new();
    peer.read_to_end(&mut bytes).unwrap();
    let mut at = 0;
    let mut last = None;
    while at < bytes.len() {
        let len = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        assert_eq!(len, 1000);
        let f = &bytes[at + 4..at + 4 + len];
        let n = (0..total)
            .find(|&n| frame(n, 1000) == f)
            .expect("a whole frame");
        assert!(last < Some(n));
        last = Some(n);
        at += 4 + len;
    }
    assert!(last.is_some());
}

#[test]
fn the_stream_wire_listens_and_connects() {
    let path = socket_path("stream");
    let listener = StreamWire::listen(&path, MAX_FRAME).unwrap();
    let mut client = StreamWire::connect(&path, MAX_FRAME).unwrap();
    let mut server = listener.accept(Duration::from_secs(1)).unwrap();
    client.send(&frame(1, 200)).unwrap();
    server.send(&frame(2, 300)).unwrap();
    assert_eq!(
        recv_all(&mut server, 1, Duration::from_secs(1)),
        vec![frame(1, 200)]
    );
    assert_eq!(
        recv_all(&mut client, 1, Duration::from_secs(1)),
        vec![frame(2, 300)]
    );
    drop(listener);
    assert!(!path.exists(), "the listener removes its socket");
    let lonely = StreamWire::listen(&socket_path("lonely"), MAX_FRAME).unwrap();
    assert!(lonely.accept(Duration::from_millis(10)).is_err());
}

#[test]
fn the_dgram_wire_carries_one_frame_per_datagram_and_drops_bad_sizes() {
    let (pa, pb) = (socket_path("dgram-a"), socket_path("dgram-b"));
    let mut b = DgramWire::listen(&pb, MAX_FRAME).unwrap();
    assert!(b.peer().is_none());
    b.send(&frame(0, 64)).unwrap();
    assert_eq!(b.stats().send_dropped, 1, "no peer yet");
    let mut a = DgramWire::connect(&pa, &pb, MAX_FRAME).unwrap();
    for n in 1..=5 {
        a.send(&frame(n, 60 + 200 * n as usize)).unwrap();
    }
    let got = recv_all(&mut b, 5, Duration::from_secs(1));
    assert_eq!(
        got,
        (1..=5)
            .map(|n| frame(n, 60 + 200 * n as usize))
            .collect::<Vec<_>>()
    );
    assert_eq!(b.peer(), Some(pa.as_path()), "learnt from the sender");
    b.send(&frame(9, MAX_FRAME)).unwrap();
    assert_eq!(
        recv_all(&mut a, 1, Duration::from_secs(1)),
        vec![frame(9, MAX_FRAME)]
    );
    // A raw peer sends an oversized and a runt datagram, then a good one.
    let raw = UnixDatagram::unbound().unwrap();
    raw.send_to(&vec![1; MAX_FRAME + 1], &pb).unwrap();
    raw.send_to(&[1; 10], &pb).unwrap();
    raw.send_to(&frame(7, 64), &pb).unwrap();
    assert_eq!(
        recv_all(&mut b, 1, Duration::from_secs(1)),
        vec![frame(7, 64)]
    );
    assert_eq!(b.stats().recv_dropped, 2);
    assert_eq!(
        b.peer(),
        Some(pa.as_path()),
        "an unnamed sender is not learnt"
    );
    drop(b);
    a.send(&frame(10, 64)).unwrap();
    assert_eq!(a.stats().send_dropped, 1, "the peer is gone");
}
