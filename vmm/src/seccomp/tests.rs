//! Each class's filter, installed on a thread of the test with `EPERM` for a forbidden call, so
//! the thread sees what its class may and may not do.

use super::*;

/// The errno of a raw system call (0: it succeeded).
fn errno_of(r: libc::c_long) -> i32 {
    if r == -1 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    } else {
        0
    }
}

/// Runs `f` on a new thread that holds `class`'s filter (forbidden calls fail with EPERM).
fn under<T: Send + 'static>(class: ThreadClass, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        apply(class, SeccompAction::Errno(libc::EPERM as u32)).unwrap();
        f()
    })
    .join()
    .unwrap()
}

/// What a filtered thread gets from the calls that tell the classes apart.
#[derive(Debug)]
struct Probe {
    getpid: i32,
    getppid: i32,
    execve: i32,
    socket: i32,
    open_read: i32,
    open_create: i32,
    mmap_exec: i32,
    mmap_rw: i32,
    kvm_run: i32,
    kvm_create_vm: i32,
    vfio: i32,
    clone3: i32,
    spawn: bool,
}

fn probe() -> Probe {
    let ioctl = |req: u64| {
        // SAFETY: an ioctl on an invalid descriptor: the filter or EBADF answers it.
        errno_of(unsafe { libc::syscall(libc::SYS_ioctl, -1, req, 0) })
    };
    // VFIO_GET_API_VERSION: _IO(';', 100).
    let vfio_get_api_version = (u64::from(b';') << 8) | 100;
    let path = c"/proc/self/status";
    let created = std::env::temp_dir().join(format!("ddvm-seccomp-{}", std::process::id()));
    let created = std::ffi::CString::new(created.to_str().unwrap()).unwrap();
    let exe = c"/nonexistent-ddvm";
    let argv = [exe.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null::<libc::c_char>()];
    // SAFETY: raw calls with valid pointers to NUL-terminated strings and arrays; a mapping
    // that succeeds is unmapped; a file that is opened is closed and removed.
    unsafe {
        let open = |p: &std::ffi::CStr, flags: i32| {
            let fd = libc::syscall(libc::SYS_openat, libc::AT_FDCWD, p.as_ptr(), flags, 0o600);
            if fd >= 0 {
                libc::close(fd as i32);
            }
            errno_of(fd)
        };
        let map = |prot: i32| {
            let p = libc::mmap(
                std::ptr::null_mut(),
                4096,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if p == libc::MAP_FAILED {
                std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
            } else {
                libc::munmap(p, 4096);
                0
            }
        };
        let socket = libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_DGRAM, 0);
        if socket >= 0 {
            libc::close(socket as i32);
        }
        let p = Probe {
            getpid: errno_of(libc::syscall(libc::SYS_getpid)),
            getppid: errno_of(libc::syscall(libc::SYS_getppid)),
            execve: errno_of(libc::syscall(
                libc::SYS_execve,
                exe.as_ptr(),
                argv.as_ptr(),
                envp.as_ptr(),
            )),
            socket: errno_of(socket),
            open_read: open(path, libc::O_RDONLY | libc::O_CLOEXEC),
            open_create: open(&created, libc::O_WRONLY | libc::O_CREAT | libc::O_CLOEXEC),
            mmap_exec: map(libc::PROT_READ | libc::PROT_EXEC),
            mmap_rw: map(libc::PROT_READ | libc::PROT_WRITE),
            kvm_run: ioctl(req::KVM_RUN()),
            kvm_create_vm: ioctl(req::KVM_CREATE_VM()),
            vfio: ioctl(vfio_get_api_version),
            clone3: errno_of(libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0)),
            spawn: std::thread::Builder::new()
                .spawn(|| ())
                .is_ok_and(|t| t.join().is_ok()),
        };
        libc::unlink(created.as_ptr());
        p
    }
}

const OK: i32 = 0;
const EPERM: i32 = libc::EPERM;
const EBADF: i32 = libc::EBADF;

#[test]
fn every_class_refuses_what_no_thread_does() {
    for class in ThreadClass::ALL {
        let p = under(class, probe);
        let name = class.name();
        assert_eq!(p.getpid, OK, "{name}: {p:?}");
        assert_eq!(p.mmap_rw, OK, "{name}: {p:?}");
        assert_eq!(p.open_read, OK, "{name}: {p:?}");
        // Forbidden to every thread: a call none makes, starting a program, executable memory.
        assert_eq!(p.getppid, EPERM, "{name}: {p:?}");
        assert_eq!(p.execve, EPERM, "{name}: {p:?}");
        assert_eq!(p.mmap_exec, EPERM, "{name}: {p:?}");
        // clone3 cannot be checked, so it is never available: a class that starts threads
        // gets ENOSYS (the C library then uses clone), the others may not call it at all.
        let clone3 = if class.children().is_empty() {
            EPERM
        } else {
            libc::ENOSYS
        };
        assert_eq!(p.clone3, clone3, "{name}: {p:?}");
    }
}

#[test]
fn only_the_main_thread_makes_sockets_and_creates_files() {
    for class in ThreadClass::ALL {
        let p = under(class, probe);
        let main = class == ThreadClass::Main;
        let expect = if main { OK } else { EPERM };
        assert_eq!(p.socket, expect, "{}: {p:?}", class.name());
        assert_eq!(p.open_create, expect, "{}: {p:?}", class.name());
    }
}

#[test]
fn kvm_requests_are_allowed_by_class() {
    use ThreadClass::*;
    for class in ThreadClass::ALL {
        let p = under(class, probe);
        // EBADF: the filter let the request through to the kernel, which found no descriptor.
        let (run, create_vm, vfio) = match class {
            Main | BlockService | NetService | StandbyBooter => (EBADF, EBADF, EBADF),
            Vcpu => (EBADF, EPERM, EBADF),
            DeviceWorker | IrqResampler | Control | ControlConn => (EPERM, EPERM, EPERM),
        };
        assert_eq!(
            (p.kvm_run, p.kvm_create_vm, p.vfio),
            (run, create_vm, vfio),
            "{}: {p:?}",
            class.name()
        );
    }
}

#[test]
fn only_classes_that_start_threads_may() {
    for class in ThreadClass::ALL {
        let p = under(class, probe);
        assert_eq!(
            p.spawn,
            !class.children().is_empty(),
            "{}: {p:?}",
            class.name()
        );
    }
}

#[test]
fn a_child_keeps_what_its_class_allows_under_its_parents_filter() {
    for parent in ThreadClass::ALL {
        for &child in parent.children() {
            let alone = under(child, probe);
            let nested = under(parent, move || {
                std::thread::spawn(move || {
                    apply(child, SeccompAction::Errno(libc::EPERM as u32)).unwrap();
                    probe()
                })
                .join()
                .unwrap()
            });
            assert_eq!(
                format!("{alone:?}"),
                format!("{nested:?}"),
                "{} under {}",
                child.name(),
                parent.name()
            );
        }
    }
}

#[test]
fn mode_parses_the_three_words_and_nothing_else() {
    assert_eq!("true".parse::<Mode>(), Ok(Mode::True));
    assert_eq!("log".parse::<Mode>(), Ok(Mode::Log));
    assert_eq!("false".parse::<Mode>(), Ok(Mode::False));
    assert!("yes"
        .parse::<Mode>()
        .unwrap_err()
        .contains("true, false or log"));
}

#[test]
fn every_filter_compiles_within_the_kernels_limit() {
    for class in ThreadClass::ALL {
        let p = program(class, SeccompAction::Trap).unwrap();
        // BPF_MAXINSNS.
        assert!(
            p.len() <= 4096,
            "{}: {} instructions",
            class.name(),
            p.len()
        );
    }
}
