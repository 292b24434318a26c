//! Safe wrappers for the few host calls the control socket and the stop path make that the
//! standard library does not: the peer's credentials of a Unix socket, the effective user,
//! `poll`, the SIGINT/SIGTERM handler, and the CPUs a thread may use. Every `unsafe` block of
//! them is here.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

/// Who is at the other end of a connected Unix socket, as the kernel recorded it at
/// `connect` (SO_PEERCRED): it cannot be forged by the peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    /// Process id.
    pub pid: i32,
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
}

/// The credentials of the peer of the Unix stream socket `fd`.
pub fn peer_cred(fd: BorrowedFd<'_>) -> std::io::Result<PeerCred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `fd` is an open descriptor for the borrow's lifetime; `cred` and `len` are valid
    // for writes and `len` holds the size of `cred`, so the kernel writes within it.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if len as usize != std::mem::size_of::<libc::ucred>() {
        return Err(std::io::Error::other("SO_PEERCRED: short answer"));
    }
    Ok(PeerCred {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// This process's effective user id.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Waits until one of `fds` is readable (or hung up, or in error), or `timeout` passes
/// (`None`: for ever). Returns, for each, whether it is ready; all false on timeout. An
/// interrupted wait returns all false too: callers loop.
pub fn poll_readable(
    fds: &[BorrowedFd<'_>],
    timeout: Option<Duration>,
) -> std::io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.map_or(-1, |t| {
        libc::c_int::try_from(t.as_millis().max(u128::from(t > Duration::ZERO)))
            .unwrap_or(libc::c_int::MAX)
    });
    // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd entries, each naming a descriptor
    // borrowed (so open) for this call.
    let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(vec![false; fds.len()]);
        }
        return Err(e);
    }
    Ok(pfds.iter().map(|p| p.revents != 0).collect())
}

/// Installs `handler` for SIGINT and SIGTERM. The handler runs in signal context: it may only
/// do what is async-signal-safe (store to an atomic, write to a pipe).
pub fn on_stop_signals(handler: extern "C" fn(libc::c_int)) {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: installing a handler is sound for any function of this signature; what it
        // does is the caller's contract above.
        unsafe {
            libc::signal(sig, handler as *const () as libc::sighandler_t);
        }
    }
}

/// The calling thread's kernel id.
pub fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() }
}

/// Whether the calling thread may run on more than one CPU (its affinity mask; a mask that
/// cannot be read counts as more than one). Where it cannot, a thread that polls for work
/// another thread must produce takes the CPU that thread needs: polling only delays it.
pub fn cpus_to_spare() -> bool {
    // SAFETY: a zeroed cpu_set_t is an empty set; sched_getaffinity writes at most
    // `size_of::<cpu_set_t>()` bytes into it, and CPU_COUNT only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return true;
        }
        libc::CPU_COUNT(&set) > 1
    }
}

/// Moves the calling thread to `SCHED_BATCH`: the scheduler no longer lets it preempt the
/// thread running when it wakes. For a thread that serves what a guest queues (a block
/// service, a driver domain's vCPU) on a CPU it shares with that guest's vCPU: woken by the
/// guest's first request, it waits until the guest stops or its slice ends, and then takes
/// everything the guest queued meanwhile in one pass, instead of one request per wake-up.
pub fn batch_scheduling() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param that the call only
    // reads.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The kernel's clock ticks per second (`/proc` times are in these), if it says.
pub fn clock_ticks_per_second() -> Option<u64> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz).ok().filter(|&h| h > 0)
}

/// The CPU-time clock of a thread that has not been joined, if the host gives one. (Once the
/// thread is joined the id may name another thread: read it only while the handle is held.)
pub fn thread_cpu_clock<T>(thread: &std::thread::JoinHandle<T>) -> Option<libc::clockid_t> {
    use std::os::unix::thread::JoinHandleExt;
    let mut clock: libc::clockid_t = 0;
    // SAFETY: the thread is not joined (its handle is borrowed), so its pthread_t is valid;
    // `clock` is a valid out pointer.
    let r = unsafe { libc::pthread_getcpuclockid(thread.as_pthread_t(), &mut clock) };
    (r == 0).then_some(clock)
}

/// The time of `clock` (a CPU-time clock from [`thread_cpu_clock`]), if it can be read.
pub fn clock_time(clock: libc::clockid_t) -> Option<std::time::Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out pointer; an id that names no clock is refused (EINVAL).
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    Some(std::time::Duration::new(
        u64::try_from(ts.tv_sec).ok()?,
        u32::try_from(ts.tv_nsec).ok()?,
    ))
}

/// Ends the process at once with `status`, running nothing else (no destructors, no atexit
/// handlers): what a signal handler may do.
pub fn exit_now(status: i32) -> ! {
    // SAFETY: `_exit` is async-signal-safe and takes any status.
    unsafe { libc::_exit(status) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn thread_ids_and_cpu_clocks_are_this_hosts() {
        let me = std::fs::read_link("/proc/thread-self").unwrap();
        let tid: i32 = me.file_name().unwrap().to_str().unwrap().parse().unwrap();
        assert_eq!(gettid(), tid, "{me:?}");
        assert!(clock_ticks_per_second().is_some_and(|hz| hz >= 1));
        let t = std::thread::spawn(|| {
            let t0 = std::time::Instant::now();
            while t0.elapsed() < std::time::Duration::from_millis(20) {}
            gettid()
        });
        let clock = thread_cpu_clock(&t).expect("a CPU clock");
        assert!(clock_time(clock).is_some());
        assert_ne!(t.join().unwrap(), gettid());
        assert_eq!(clock_time(libc::clockid_t::MAX), None, "no such clock");
    }

    #[test]
    fn peer_cred_names_this_process() {
        let (a, _b) = UnixStream::pair().unwrap();
        let c = peer_cred(a.as_fd()).unwrap();
        assert_eq!(c.pid as u32, std::process::id());
        assert_eq!(c.uid, euid());
    }

    #[test]
    fn poll_sees_readable_and_times_out() {
        use std::io::Write;
        let (a, mut b) = UnixStream::pair().unwrap();
        let r = poll_readable(&[a.as_fd()], Some(Duration::from_millis(10))).unwrap();
        assert_eq!(r, [false]);
        b.write_all(b"x").unwrap();
        let r = poll_readable(&[a.as_fd(), b.as_fd()], None).unwrap();
        assert_eq!(r, [true, false]);
    }
}
