//! Why a driver domain is considered failed: one variant per detection source, each carrying the
//! data that explains it. [`FailureReason::name`] is the stable label used in metrics, events and
//! hook arguments; `Display` is the sentence for humans.

use std::fmt;
use std::time::Duration;

use ddvm_abi::panic::vector_name;
use serde::{Deserialize, Serialize, Serializer};

/// A detected failure of a driver domain.
///
/// Serialized (JSON) with a `kind` tag, e.g. `{"kind":"panic","message":"..."}`; durations as
/// whole microseconds in `*_us` fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum FailureReason {
    /// The vCPU exited with KVM_EXIT_SHUTDOWN (a triple fault: an exception it could not take).
    Shutdown,
    /// KVM_EXIT_INTERNAL_ERROR: KVM could not run or emulate the domain.
    InternalError {
        /// KVM's sub-error code.
        suberror: u32,
    },
    /// KVM_EXIT_FAIL_ENTRY: the hardware refused to enter the domain.
    FailedEntry {
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// A Rust panic inside the domain, reported on the panic port.
    Panic {
        /// The domain's panic message.
        message: String,
    },
    /// A CPU exception inside the domain, reported by its IDT handler on the panic port.
    Exception {
        /// Vector.
        vector: u32,
        /// Faulting instruction.
        rip: u64,
        /// Error code (0 where the vector has none).
        error_code: u64,
        /// CR2 (page faults).
        cr2: u64,
    },
    /// The panic port was written without a valid panic record.
    BadPanicReport {
        /// Value written to the port.
        value: u32,
    },
    /// The domain halted with nothing that could wake it.
    Halted,
    /// The vCPU stopped on an exit a driver domain never causes.
    UnexpectedExit {
        /// The exit, as KVM reported it.
        exit: String,
    },
    /// The domain wrote the exit port: a driver domain never exits on its own.
    ExitedUnexpectedly {
        /// Exit status it wrote.
        status: u32,
    },
    /// The heartbeat counter did not move for longer than the configured period.
    HeartbeatStall {
        /// The counter's value, stuck.
        last: u64,
        /// How long it has not moved.
        #[serde(rename = "stalled_for_us", with = "crate::micros")]
        stalled_for: Duration,
        /// The configured period.
        #[serde(rename = "period_us", with = "crate::micros")]
        period: Duration,
    },
    /// A request stayed in flight past its deadline.
    Deadline {
        /// Tag of the oldest overdue request.
        tag: u32,
        /// Time since it was submitted to the domain.
        #[serde(rename = "age_us", with = "crate::micros")]
        age: Duration,
        /// The configured deadline.
        #[serde(rename = "deadline_us", with = "crate::micros")]
        deadline: Duration,
    },
    /// The domain broke the channel protocol.
    Protocol(ProtocolViolation),
    /// The device model refused DMA outside the domain's memory (or with bus mastering off).
    DmaRefused {
        /// Refused accesses since the last check.
        count: u64,
    },
    /// A flush completed with an error while acknowledged writes may still be only in a
    /// volatile cache: whether they are durable is unknown, so the domain is failed and the
    /// next one replays them and flushes again.
    FlushFailed {
        /// The channel status the domain completed it with.
        status: u16,
    },
    /// The host failed to run the domain (`KVM_RUN` itself failed): the host's fault, not the
    /// domain's; it is recovered like a failure, and named apart so nobody blames the driver.
    HostError {
        /// The error number `KVM_RUN` returned.
        errno: i32,
    },
    /// The VMM could not start a fresh domain (memory, image, KVM).
    BootFailed {
        /// What failed.
        message: String,
    },
    /// A write the VMM replayed after a restart (one a volatile write cache may have lost)
    /// completed with an error: the domain or its device could not make an acknowledged write
    /// good again. It stays in the write log and is replayed on the next domain.
    ReplayFailed {
        /// First sector of the write.
        sector: u64,
        /// Its sectors.
        sectors: u32,
        /// The channel status the domain completed it with.
        status: u16,
    },
    /// A fresh domain did not report ready within the boot timeout.
    BootTimeout {
        /// Time since its boot started.
        #[serde(rename = "waited_us", with = "crate::micros")]
        waited: Duration,
    },
    /// The operator asked for it.
    Operator(OperatorAction),
    /// The VMM found its own bookkeeping of the device broken (a completion with no shadow
    /// entry, a transition its supervisor refused, a ring it filled past its free space): no
    /// restart can be trusted to make that good, so the device is given up, loudly.
    VmmInvariant {
        /// What was found.
        what: String,
    },
}

/// A channel protocol violation by a driver domain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "violation", rename_all = "kebab-case")]
pub enum ProtocolViolation {
    /// A completion for a tag that is not in flight.
    UnknownTag {
        /// Tag the domain completed.
        tag: u32,
    },
    /// A completion carrying another boot's epoch.
    StaleEpoch {
        /// Tag the domain completed.
        tag: u32,
        /// Epoch in the completion (low 32 bits).
        epoch: u32,
        /// This boot's epoch (low 32 bits).
        expected: u32,
    },
    /// A completion reporting more bytes than the request had.
    LengthOverRequest {
        /// Tag the domain completed.
        tag: u32,
        /// Bytes it reported.
        len: u32,
        /// Bytes of the request.
        max: u32,
    },
    /// A ring index the domain publishes moved backwards.
    IndexBackwards {
        /// Which ring.
        ring: Ring,
        /// Last value seen.
        old: u32,
        /// Value read now.
        new: u32,
    },
    /// A ring index the domain publishes is past what the producer made available.
    IndexPastProducer {
        /// Which ring.
        ring: Ring,
        /// Value read.
        index: u32,
        /// The highest value it may have.
        limit: u32,
    },
    /// Garbage in the channel header (magic, version, state, geometry).
    BadHeader {
        /// What was wrong.
        what: String,
    },
    /// Garbage in the device info the domain published.
    BadDeviceInfo {
        /// What was wrong.
        what: String,
    },
}

/// One of the two channel rings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Ring {
    /// VMM → domain.
    Request,
    /// Domain → VMM.
    Completion,
}

/// What the operator asked for (control socket).
///
/// Serialized with an `action` tag: `{"action":"update","image":"dd.elf"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum OperatorAction {
    /// Kill the domain as if it crashed: detection, policy and recovery run as for a crash.
    Kill,
    /// Restart the domain now, with a fresh restart history (also leaves the gave-up state).
    Restart,
    /// Restart the domain now on a new image (live update), with a fresh restart history.
    Update {
        /// The new image.
        image: String,
    },
}

impl FailureReason {
    /// Every value [`name`](Self::name) can return, e.g. to export zero counters.
    pub const NAMES: &'static [&'static str] = &[
        "shutdown",
        "internal-error",
        "failed-entry",
        "panic",
        "exception",
        "bad-panic-report",
        "halted",
        "unexpected-exit",
        "exited",
        "heartbeat",
        "deadline",
        "protocol-unknown-tag",
        "protocol-stale-epoch",
        "protocol-length",
        "protocol-index-backwards",
        "protocol-index-past-producer",
        "protocol-bad-header",
        "protocol-bad-device-info",
        "dma-refused",
        "replay-failed",
        "flush-failed",
        "host-error",
        "boot-failed",
        "boot-timeout",
        "operator-kill",
        "operator-restart",
        "operator-update",
        "vmm-invariant",
    ];

    /// Stable short kebab-case name: metric label, event field, hook argument.
    pub fn name(&self) -> &'static str {
        match self {
            FailureReason::Shutdown => "shutdown",
            FailureReason::InternalError { .. } => "internal-error",
            FailureReason::FailedEntry { .. } => "failed-entry",
            FailureReason::Panic { .. } => "panic",
            FailureReason::Exception { .. } => "exception",
            FailureReason::BadPanicReport { .. } => "bad-panic-report",
            FailureReason::Halted => "halted",
            FailureReason::UnexpectedExit { .. } => "unexpected-exit",
            FailureReason::ExitedUnexpectedly { .. } => "exited",
            FailureReason::HeartbeatStall { .. } => "heartbeat",
            FailureReason::Deadline { .. } => "deadline",
            FailureReason::Protocol(v) => v.name(),
            FailureReason::DmaRefused { .. } => "dma-refused",
            FailureReason::ReplayFailed { .. } => "replay-failed",
            FailureReason::FlushFailed { .. } => "flush-failed",
            FailureReason::HostError { .. } => "host-error",
            FailureReason::BootFailed { .. } => "boot-failed",
            FailureReason::BootTimeout { .. } => "boot-timeout",
            FailureReason::Operator(a) => a.name(),
            FailureReason::VmmInvariant { .. } => "vmm-invariant",
        }
    }

    /// Whether the operator asked for this (as opposed to a detected defect).
    pub fn is_operator(&self) -> bool {
        matches!(self, FailureReason::Operator(_))
    }

    /// Name, message and details in one serializable value (status, reports).
    pub fn report(&self) -> ReasonReport {
        ReasonReport {
            name: self.name(),
            message: self.to_string(),
            detail: self.clone(),
        }
    }
}

impl ProtocolViolation {
    /// Stable short name, `protocol-...`.
    pub fn name(&self) -> &'static str {
        match self {
            ProtocolViolation::UnknownTag { .. } => "protocol-unknown-tag",
            ProtocolViolation::StaleEpoch { .. } => "protocol-stale-epoch",
            ProtocolViolation::LengthOverRequest { .. } => "protocol-length",
            ProtocolViolation::IndexBackwards { .. } => "protocol-index-backwards",
            ProtocolViolation::IndexPastProducer { .. } => "protocol-index-past-producer",
            ProtocolViolation::BadHeader { .. } => "protocol-bad-header",
            ProtocolViolation::BadDeviceInfo { .. } => "protocol-bad-device-info",
        }
    }
}

impl OperatorAction {
    /// Stable short name, `operator-...`.
    pub fn name(&self) -> &'static str {
        match self {
            OperatorAction::Kill => "operator-kill",
            OperatorAction::Restart => "operator-restart",
            OperatorAction::Update { .. } => "operator-update",
        }
    }
}

impl From<ProtocolViolation> for FailureReason {
    fn from(v: ProtocolViolation) -> Self {
        FailureReason::Protocol(v)
    }
}

impl From<OperatorAction> for FailureReason {
    fn from(a: OperatorAction) -> Self {
        FailureReason::Operator(a)
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailureReason::Shutdown => write!(f, "triple fault (shutdown exit)"),
            FailureReason::InternalError { suberror } => {
                write!(f, "KVM internal error (suberror {suberror})")
            }
            FailureReason::FailedEntry { reason } => {
                write!(f, "VM entry failed (hardware reason {reason:#x})")
            }
            FailureReason::Panic { message } => write!(f, "panicked: {message}"),
            FailureReason::Exception {
                vector,
                rip,
                error_code,
                cr2,
            } => {
                let name = vector_name(*vector);
                write!(f, "exception {vector} ({name}) at rip={rip:#x}")?;
                write!(f, " error_code={error_code:#x}")?;
                if *vector == 14 {
                    write!(f, " cr2={cr2:#x}")?;
                }
                Ok(())
            }
            FailureReason::BadPanicReport { value } => write!(
                f,
                "panic port written ({value:#x}) without a valid panic record"
            ),
            FailureReason::Halted => write!(f, "halted with nothing to wake it"),
            FailureReason::UnexpectedExit { exit } => write!(f, "unexpected exit {exit}"),
            FailureReason::ExitedUnexpectedly { status } => {
                write!(f, "exited with status {status}")
            }
            FailureReason::HeartbeatStall {
                last,
                stalled_for,
                period,
            } => write!(
                f,
                "heartbeat stuck at {last} for {stalled_for:?} (period {period:?})"
            ),
            FailureReason::Deadline { tag, age, deadline } => write!(
                f,
                "request {tag} in flight for {age:?} (deadline {deadline:?})"
            ),
            FailureReason::Protocol(v) => write!(f, "protocol violation: {v}"),
            FailureReason::DmaRefused { count } => write!(
                f,
                "{count} DMA access(es) outside the domain refused (by the DMA window or the IOMMU)"
            ),
            FailureReason::ReplayFailed {
                sector,
                sectors,
                status,
            } => write!(
                f,
                "replayed write of {sectors} sector(s) at {sector} failed (channel status {status})"
            ),
            FailureReason::FlushFailed { status } => write!(
                f,
                "a flush failed (channel status {status}) with writes not known to be durable"
            ),
            FailureReason::HostError { errno } => write!(
                f,
                "the host failed to run it (KVM_RUN: {}; not the domain's fault)",
                std::io::Error::from_raw_os_error(*errno)
            ),
            FailureReason::BootFailed { message } => write!(f, "boot failed: {message}"),
            FailureReason::BootTimeout { waited } => {
                write!(f, "not ready {waited:?} after its boot started")
            }
            FailureReason::Operator(a) => write!(f, "operator: {a}"),
            FailureReason::VmmInvariant { what } => write!(f, "VMM invariant broken: {what}"),
        }
    }
}

impl fmt::Display for ProtocolViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolViolation::UnknownTag { tag } => {
                write!(f, "completion for tag {tag}, which is not in flight")
            }
            ProtocolViolation::StaleEpoch {
                tag,
                epoch,
                expected,
            } => write!(
                f,
                "completion for tag {tag} carries epoch {epoch}, expected {expected}"
            ),
            ProtocolViolation::LengthOverRequest { tag, len, max } => write!(
                f,
                "completion for tag {tag} reports {len} bytes, the request had {max}"
            ),
            ProtocolViolation::IndexBackwards { ring, old, new } => {
                write!(f, "{ring} ring index moved backwards from {old} to {new}")
            }
            ProtocolViolation::IndexPastProducer { ring, index, limit } => write!(
                f,
                "{ring} ring index {index} is past the producer (at most {limit})"
            ),
            ProtocolViolation::BadHeader { what } => write!(f, "bad channel header: {what}"),
            ProtocolViolation::BadDeviceInfo { what } => write!(f, "bad device info: {what}"),
        }
    }
}

impl fmt::Display for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Ring::Request => "request",
            Ring::Completion => "completion",
        })
    }
}

impl fmt::Display for OperatorAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OperatorAction::Kill => write!(f, "kill"),
            OperatorAction::Restart => write!(f, "restart"),
            OperatorAction::Update { image } => write!(f, "update to image {image}"),
        }
    }
}

/// A failure reason as reported in JSON: `{"name", "message", "detail": {"kind", ...}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReasonReport {
    /// [`FailureReason::name`].
    pub name: &'static str,
    /// The `Display` sentence.
    pub message: String,
    /// The reason with its data.
    pub detail: FailureReason,
}

/// Serializes a reason as a [`ReasonReport`] without storing one (`serialize_with`).
pub(crate) fn serialize_report<S: Serializer>(r: &FailureReason, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeStruct;
    let mut st = s.serialize_struct("ReasonReport", 3)?;
    st.serialize_field("name", r.name())?;
    st.serialize_field("message", &r.to_string())?;
    st.serialize_field("detail", r)?;
    st.end()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One example of every variant, with the name it must have.
    pub(crate) fn examples() -> Vec<(FailureReason, &'static str)> {
        let ms = Duration::from_millis;
        let p = FailureReason::Protocol;
        vec![
            (FailureReason::Shutdown, "shutdown"),
            (
                FailureReason::InternalError { suberror: 1 },
                "internal-error",
            ),
            (FailureReason::FailedEntry { reason: 0x21 }, "failed-entry"),
            (
                FailureReason::Panic {
                    message: "boom".into(),
                },
                "panic",
            ),
            (
                FailureReason::Exception {
                    vector: 14,
                    rip: 0x10_0000,
                    error_code: 2,
                    cr2: 0xdead_0000,
                },
                "exception",
            ),
            (
                FailureReason::BadPanicReport { value: 7 },
                "bad-panic-report",
            ),
            (FailureReason::Halted, "halted"),
            (
                FailureReason::UnexpectedExit { exit: "Hlt".into() },
                "unexpected-exit",
            ),
            (FailureReason::ExitedUnexpectedly { status: 3 }, "exited"),
            (
                FailureReason::HeartbeatStall {
                    last: 42,
                    stalled_for: ms(150),
                    period: ms(100),
                },
                "heartbeat",
            ),
            (
                FailureReason::Deadline {
                    tag: 9,
                    age: ms(5001),
                    deadline: ms(5000),
                },
                "deadline",
            ),
            (
                p(ProtocolViolation::UnknownTag { tag: 77 }),
                "protocol-unknown-tag",
            ),
            (
                p(ProtocolViolation::StaleEpoch {
                    tag: 1,
                    epoch: 2,
                    expected: 3,
                }),
                "protocol-stale-epoch",
            ),
            (
                p(ProtocolViolation::LengthOverRequest {
                    tag: 1,
                    len: 8192,
                    max: 4096,
                }),
                "protocol-length",
            ),
            (
                p(ProtocolViolation::IndexBackwards {
                    ring: Ring::Completion,
                    old: 10,
                    new: 9,
                }),
                "protocol-index-backwards",
            ),
            (
                p(ProtocolViolation::IndexPastProducer {
                    ring: Ring::Request,
                    index: 20,
                    limit: 16,
                }),
                "protocol-index-past-producer",
            ),
            (
                p(ProtocolViolation::BadHeader {
                    what: "magic".into(),
                }),
                "protocol-bad-header",
            ),
            (
                p(ProtocolViolation::BadDeviceInfo {
                    what: "block size 3".into(),
                }),
                "protocol-bad-device-info",
            ),
            (FailureReason::DmaRefused { count: 2 }, "dma-refused"),
            (
                FailureReason::ReplayFailed {
                    sector: 8,
                    sectors: 8,
                    status: 2,
                },
                "replay-failed",
            ),
            (FailureReason::FlushFailed { status: 1 }, "flush-failed"),
            (FailureReason::HostError { errno: 12 }, "host-error"),
            (
                FailureReason::BootFailed {
                    message: "ENOMEM".into(),
                },
                "boot-failed",
            ),
            (
                FailureReason::BootTimeout { waited: ms(2001) },
                "boot-timeout",
            ),
            (
                FailureReason::VmmInvariant {
                    what: "completion for tag 7 has no shadow entry".into(),
                },
                "vmm-invariant",
            ),
            (
                FailureReason::Operator(OperatorAction::Kill),
                "operator-kill",
            ),
            (
                FailureReason::Operator(OperatorAction::Restart),
                "operator-restart",
            ),
            (
                FailureReason::Operator(OperatorAction::Update {
                    image: "dd.elf".into(),
                }),
                "operator-update",
            ),
        ]
    }

    #[test]
    fn every_reason_has_its_listed_name_and_a_message() {
        let examples = examples();
        assert_eq!(examples.len(), FailureReason::NAMES.len());
        for (reason, name) in &examples {
            assert_eq!(reason.name(), *name);
            assert!(FailureReason::NAMES.contains(name), "{name} not in NAMES");
            assert!(!reason.to_string().is_empty());
        }
    }

    #[test]
    fn messages_explain_the_failure() {
        let pf = &examples()[4].0;
        assert_eq!(
            pf.to_string(),
            "exception 14 (#PF page fault) at rip=0x100000 error_code=0x2 cr2=0xdead0000"
        );
        let hb = &examples()[9].0;
        assert_eq!(
            hb.to_string(),
            "heartbeat stuck at 42 for 150ms (period 100ms)"
        );
        let idx = FailureReason::from(ProtocolViolation::IndexBackwards {
            ring: Ring::Completion,
            old: 10,
            new: 9,
        });
        assert_eq!(
            idx.to_string(),
            "protocol violation: completion ring index moved backwards from 10 to 9"
        );
    }

    #[test]
    fn reasons_round_trip_through_json() {
        for (reason, _) in examples() {
            let json = serde_json::to_string(&reason).unwrap();
            let back: FailureReason = serde_json::from_str(&json).unwrap();
            assert_eq!(back, reason, "{json}");
        }
        let json = serde_json::to_value(&examples()[9].0).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"kind": "heartbeat-stall", "last": 42,
                "stalled_for_us": 150_000, "period_us": 100_000})
        );
    }

    #[test]
    fn report_carries_name_message_and_detail() {
        let r = FailureReason::from(ProtocolViolation::UnknownTag { tag: 5 });
        let json = serde_json::to_value(r.report()).unwrap();
        assert_eq!(json["name"], "protocol-unknown-tag");
        assert_eq!(
            json["message"],
            "protocol violation: completion for tag 5, which is not in flight"
        );
        assert_eq!(json["detail"]["kind"], "protocol");
        assert_eq!(json["detail"]["violation"], "unknown-tag");
        assert_eq!(json["detail"]["tag"], 5);
    }

    #[test]
    fn operator_actions_parse_from_control_json() {
        let a: OperatorAction = serde_json::from_str(r#"{"action":"update","image":"x"}"#).unwrap();
        assert_eq!(a, OperatorAction::Update { image: "x".into() });
        assert!(serde_json::from_str::<OperatorAction>(r#"{"action":"reboot"}"#).is_err());
    }
}
