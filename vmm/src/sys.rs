//! Safe wrappers for the few host calls the control socket and the stop path make that the
//! standard library does not: the peer's credentials of a Unix socket, the effective user,
//! `poll`, and the SIGINT/SIGTERM handler. Every `unsafe` block of them is here.

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
