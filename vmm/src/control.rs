//! The control socket: one JSON request per line on a Unix socket, one JSON answer per line.
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"events","since":N}`, `{"cmd":"kill","domain":D}`,
//! `{"cmd":"restart","domain":D}`, `{"cmd":"update","domain":D,"image":PATH}`,
//! `{"cmd":"inject","domain":D,"fault":KIND}` (a build with fault injection only). Answers are
//! `{"ok":true,...}` or `{"ok":false,"error":"..."}`. Malformed requests get an error answer;
//! nothing a client sends stops the server.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::blk::channel::{Command, RecoveryHandle};
use crate::loader::Image;

/// Longest request line accepted.
const MAX_LINE: usize = 64 << 10;

#[derive(Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
enum Request {
    Status,
    Events {
        #[serde(default)]
        since: u64,
    },
    Kill {
        domain: String,
    },
    Restart {
        domain: String,
    },
    Update {
        domain: String,
        image: PathBuf,
    },
    // Parsed in every build, so that one without fault injection can say it has none.
    #[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
    Inject {
        domain: String,
        fault: String,
        #[serde(default)]
        arg: u32,
    },
}

/// A running control socket server.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Listens on `path` (replacing a stale socket) for the domains in `handles`.
    pub fn start(
        path: &Path,
        handles: Vec<(String, RecoveryHandle)>,
    ) -> std::io::Result<ControlServer> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                while !flag.load(Ordering::Acquire) {
                    match listener.accept() {
                        Ok((stream, _)) => serve(stream, &handles),
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })?;
        Ok(ControlServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(stream: UnixStream, handles: &[(String, RecoveryHandle)]) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream.take(MAX_LINE as u64));
    let mut line = String::new();
    let answer = match reader.read_line(&mut line) {
        Ok(_) => handle(line.trim(), handles),
        Err(e) => json!({"ok": false, "error": format!("reading the request: {e}")}),
    };
    let _ = writeln!(out, "{answer}");
}

/// Answers one request line.
pub fn handle(line: &str, handles: &[(String, RecoveryHandle)]) -> Value {
    let req: Request = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => {
            return json!({"ok": false, "error": format!("bad request: {e}; expected e.g. {{\"cmd\":\"status\"}}")})
        }
    };
    let find = |d: &str| {
        handles
            .iter()
            .find(|(n, _)| n == d)
            .map(|(_, h)| h)
            .ok_or_else(|| json!({"ok": false, "error": format!("no disk domain named {d:?}")}))
    };
    let send = |d: &str, c: Command| match find(d) {
        Ok(h) => {
            h.send(c);
            json!({"ok": true})
        }
        Err(e) => e,
    };
    match req {
        Request::Status => {
            let domains: Vec<Value> = handles
                .iter()
                .map(|(name, h)| {
                    h.with(|o| {
                        json!({
                            "domain": name,
                            "status": o.status,
                            "in_flight": o.in_flight,
                            "queued": o.queued,
                            "recoveries": o.recovered,
                            "standby_epochs": o.standbys,
                            "standby_promotions": o.promoted,
                        })
                    })
                })
                .collect();
            json!({"ok": true, "domains": domains})
        }
        Request::Events { since } => {
            let events: Vec<Value> = handles
                .iter()
                .flat_map(|(_, h)| {
                    let log = h.events.lock().unwrap_or_else(|p| p.into_inner());
                    log.since(since)
                        .filter_map(|e| serde_json::to_value(e).ok())
                        .collect::<Vec<_>>()
                })
                .collect();
            json!({"ok": true, "events": events})
        }
        Request::Kill { domain } => send(&domain, Command::Kill),
        Request::Restart { domain } => send(&domain, Command::Restart),
        Request::Update { domain, image } => match Image::from_file(&image) {
            Ok(img) => match img.check(ddvm_abi::layout::IMAGE_BASE, u64::MAX) {
                Ok(_) => send(&domain, Command::Update(img)),
                Err(e) => json!({"ok": false, "error": e.to_string()}),
            },
            Err(e) => json!({"ok": false, "error": e.to_string()}),
        },
        #[cfg(not(feature = "fault-injection"))]
        Request::Inject { .. } => {
            json!({"ok": false, "error": crate::chaos::ChaosError::Disabled.to_string()})
        }
        #[cfg(feature = "fault-injection")]
        Request::Inject { domain, fault, arg } => {
            match fault.parse::<ddvm_recovery::fault::FaultKind>() {
                Ok(kind) => send(&domain, Command::Inject { kind, arg }),
                Err(e) => json!({"ok": false, "error": e.to_string()}),
            }
        }
    }
}

/// Sends one request to the socket at `path` and returns the answer line.
pub fn request(path: &Path, req: &Value) -> std::io::Result<Value> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    writeln!(s, "{req}")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_requests_get_errors_not_crashes() {
        for bad in [
            "",
            "{",
            "{\"cmd\":\"explode\"}",
            "{\"cmd\":\"kill\"}",
            "[1,2]",
        ] {
            let a = handle(bad, &[]);
            assert_eq!(a["ok"], false, "{bad}: {a}");
            assert!(a["error"].is_string());
        }
        let a = handle("{\"cmd\":\"kill\",\"domain\":\"nope\"}", &[]);
        assert!(a["error"].as_str().unwrap().contains("nope"));
        assert_eq!(handle("{\"cmd\":\"status\"}", &[])["ok"], true);
    }

    /// A build without fault injection has no code to inject: it refuses every fault, even
    /// for a domain it does not have, and says how to get one that can.
    #[test]
    #[cfg(not(feature = "fault-injection"))]
    fn a_build_without_fault_injection_refuses_to_inject() {
        for req in [
            r#"{"cmd":"inject","domain":"nvme0","fault":"panic"}"#,
            r#"{"cmd":"inject","domain":"nope","fault":"kill","arg":3}"#,
        ] {
            let a = handle(req, &[]);
            assert_eq!(a["ok"], false, "{req}: {a}");
            let err = a["error"].as_str().unwrap();
            assert!(
                err.contains("built without fault injection")
                    && err.contains("--features fault-injection"),
                "{err}"
            );
        }
    }

    /// A build with it checks the fault's name, then the domain's.
    #[test]
    #[cfg(feature = "fault-injection")]
    fn a_build_with_fault_injection_names_a_bad_fault_or_domain() {
        let a = handle(
            r#"{"cmd":"inject","domain":"nvme0","fault":"explode"}"#,
            &[],
        );
        assert_eq!(a["ok"], false, "{a}");
        assert!(a["error"].as_str().unwrap().contains("\"explode\""), "{a}");
        let a = handle(r#"{"cmd":"inject","domain":"nope","fault":"panic"}"#, &[]);
        assert_eq!(a["ok"], false, "{a}");
        assert!(a["error"].as_str().unwrap().contains("nope"), "{a}");
    }
}
