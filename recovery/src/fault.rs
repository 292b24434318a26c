//! The faults the VMM can inject into a driver domain ([`FaultKind`]), their stable names
//! (parsed from `--faults` by [`parse_fault_list`]) and the driver-domain ABI's fault code for
//! each kind the domain acts on itself ([`FaultKind::domain_code`]).
//!
//! Injection exists only in a VMM built with the `fault-injection` feature; the kinds are here,
//! with the other reincarnation parts, because failures are recorded against the fault that led
//! to them whatever the build.

use std::fmt;
use std::str::FromStr;

use ddvm_abi::channel::fault;
use serde::{Deserialize, Serialize};

/// A fault the chaos runner injects into a driver domain.
///
/// Its [`name`](Self::name) (kebab-case, also its JSON form) is stable: it appears on the
/// command line and as a key of the chaos report's `faults_injected`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// The VMM tears the domain down abruptly, as `ddvm ctl kill` does.
    Kill,
    /// The domain panics.
    Panic,
    /// The domain stops heartbeating and spins.
    Hang,
    /// The domain scribbles garbage into the channel's rings and header.
    WildWrite,
    /// The domain completes a tag it was never given.
    BogusTag,
    /// The domain completes a request claiming more bytes than it had.
    BogusLen,
    /// The domain completes a request with an old epoch.
    StaleEpoch,
    /// The domain programs its device to DMA outside the domain's memory.
    DmaOutside,
    /// The domain holds back its completions.
    Slow,
    /// Random bit flips in the domain's code and data (SWIFI).
    Bitflip,
    /// A second fault, injected while the domain recovers from a first one.
    DuringRecovery,
    /// A CPU exception in the domain (invalid opcode or page fault).
    Exception,
    /// An exception the CPU cannot deliver: the domain's vCPU shuts down.
    TripleFault,
    /// The domain is killed, and the restarts that follow fail before ready: the next fresh or
    /// promoted domain dies during its device's bring-up, the one after it hangs there until
    /// the boot timeout fails it (as on a host that starves the restart). The domain after
    /// those must replay everything the clients are owed.
    FailedRestart,
    /// The domain is killed, and the next one fails the first write the VMM replays to it
    /// (completes it with an I/O error without writing it): the write stays owed and is
    /// replayed again on the domain after that.
    FailedReplay,
    /// The domain fails the next flush it is given (an I/O error, the device never sees it):
    /// the VMM fails the domain, and the next one replays the writes the flush was to make
    /// durable and flushes them again; the client's flush waits, it does not fail.
    FailedFlush,
    /// A network domain flaps its link word (down, up, ... every 10 ms): the VMM fails it
    /// as misbehaving once the word changes more often than a NIC's link can. Nothing on a
    /// block domain.
    LinkFlap,
    /// The VMM forgets which tag each request in flight was posted with, as a bug in its own
    /// bookkeeping would: the next completion has no shadow entry, and the VMM gives the device
    /// up loudly (an error, a `gave-up` event with reason `vmm-invariant`, requests failing).
    /// Not part of `all`: it ends the device's service until an operator restart.
    VmmInvariant,
}

impl FaultKind {
    /// Every kind, in the order `all` expands to.
    pub const ALL: [FaultKind; 17] = [
        FaultKind::Kill,
        FaultKind::Panic,
        FaultKind::Hang,
        FaultKind::WildWrite,
        FaultKind::BogusTag,
        FaultKind::BogusLen,
        FaultKind::StaleEpoch,
        FaultKind::DmaOutside,
        FaultKind::Slow,
        FaultKind::Bitflip,
        FaultKind::DuringRecovery,
        FaultKind::Exception,
        FaultKind::TripleFault,
        FaultKind::FailedRestart,
        FaultKind::FailedReplay,
        FaultKind::FailedFlush,
        FaultKind::LinkFlap,
    ];

    /// The stable name: `kill`, `wild-write`, `triple-fault`, ...
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Panic => "panic",
            FaultKind::Hang => "hang",
            FaultKind::WildWrite => "wild-write",
            FaultKind::BogusTag => "bogus-tag",
            FaultKind::BogusLen => "bogus-len",
            FaultKind::StaleEpoch => "stale-epoch",
            FaultKind::DmaOutside => "dma-outside",
            FaultKind::Slow => "slow",
            FaultKind::Bitflip => "bitflip",
            FaultKind::DuringRecovery => "during-recovery",
            FaultKind::Exception => "exception",
            FaultKind::TripleFault => "triple-fault",
            FaultKind::FailedRestart => "failed-restart",
            FaultKind::FailedReplay => "failed-replay",
            FaultKind::FailedFlush => "failed-flush",
            FaultKind::LinkFlap => "link-flap",
            FaultKind::VmmInvariant => "vmm-invariant",
        }
    }

    /// Whether this kind does anything to a domain of device class `class`
    /// (`ddvm_abi::channel::class`): a failed flush needs block flushes, a flapping link a
    /// NIC; every other kind acts on any domain.
    pub fn acts_on(self, class: u32) -> bool {
        use ddvm_abi::channel::class as c;
        match self {
            FaultKind::FailedFlush => class == c::BLK,
            FaultKind::LinkFlap => class == c::NET,
            _ => true,
        }
    }

    /// All names, comma-separated, for messages.
    fn names() -> String {
        let names: Vec<&str> = Self::ALL
            .iter()
            .chain([&FaultKind::VmmInvariant])
            .map(|k| k.name())
            .collect();
        names.join(", ")
    }

    /// The driver-domain ABI's fault code (`ddvm_abi::channel::fault`) the VMM writes into the
    /// channel header for this kind, or `None` for the kinds the VMM carries out itself: a
    /// kill (a teardown), and the kills followed by a fault in the next boots
    /// (`during-recovery`, `failed-restart`, `failed-replay`), which use the codes of
    /// [`fault::PANIC`], [`fault::HANG`] and [`fault::FAIL_WRITE`] on those boots.
    pub fn domain_code(self) -> Option<u32> {
        Some(match self {
            FaultKind::Panic => fault::PANIC,
            FaultKind::Hang => fault::HANG,
            FaultKind::Exception => fault::INVALID_OPCODE,
            FaultKind::TripleFault => fault::TRIPLE_FAULT,
            FaultKind::WildWrite => fault::WILD_WRITE,
            FaultKind::BogusTag => fault::BOGUS_TAG,
            FaultKind::BogusLen => fault::BOGUS_LEN,
            FaultKind::StaleEpoch => fault::STALE_EPOCH,
            FaultKind::DmaOutside => fault::DMA_OUTSIDE,
            FaultKind::Slow => fault::SLOW,
            FaultKind::Bitflip => fault::BITFLIP,
            FaultKind::FailedFlush => fault::FAIL_FLUSH,
            FaultKind::LinkFlap => fault::LINK_FLAP,
            FaultKind::Kill
            | FaultKind::DuringRecovery
            | FaultKind::FailedRestart
            | FaultKind::FailedReplay
            | FaultKind::VmmInvariant => return None,
        })
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One name (`all` is a list word: see [`parse_fault_list`]).
impl FromStr for FaultKind {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, ParseError> {
        let item = s.trim();
        Self::ALL
            .into_iter()
            .chain([FaultKind::VmmInvariant])
            .find(|k| k.name() == item)
            .ok_or_else(|| ParseError::UnknownFault {
                item: item.to_string(),
            })
    }
}

/// A bad `--faults` list; the message names the bad item and the kinds accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// An item of a fault list is not a fault kind.
    #[error("unknown fault kind {item:?}: valid kinds are {valid}, or all", valid = FaultKind::names())]
    UnknownFault {
        /// The item, trimmed.
        item: String,
    },
    /// The fault list has no items.
    #[error("no fault kinds given: expected a comma-separated list of {valid}, or all", valid = FaultKind::names())]
    NoFaults,
}

/// Parses `--faults`: comma-separated [`FaultKind`] names, or `all` for every kind.
/// Whitespace around items is ignored, duplicates are dropped (first position kept).
pub fn parse_fault_list(s: &str) -> Result<Vec<FaultKind>, ParseError> {
    if s.trim().is_empty() {
        return Err(ParseError::NoFaults);
    }
    let mut kinds = Vec::new();
    for item in s.split(',') {
        let add: Vec<FaultKind> = if item.trim() == "all" {
            FaultKind::ALL.to_vec()
        } else {
            vec![item.parse()?]
        };
        for kind in add {
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
    }
    Ok(kinds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_lists_parse_names_and_all() {
        assert_eq!(
            parse_fault_list("kill, panic,hang").unwrap(),
            [FaultKind::Kill, FaultKind::Panic, FaultKind::Hang]
        );
        assert_eq!(parse_fault_list("all").unwrap(), FaultKind::ALL);
        assert_eq!(parse_fault_list("slow,all").unwrap()[0], FaultKind::Slow);
        assert_eq!(parse_fault_list("slow,all").unwrap().len(), 17);
        assert_eq!(parse_fault_list("kill,kill").unwrap(), [FaultKind::Kill]);
        assert!(!FaultKind::ALL.contains(&FaultKind::VmmInvariant));
        for k in FaultKind::ALL.into_iter().chain([FaultKind::VmmInvariant]) {
            assert_eq!(k.name().parse::<FaultKind>(), Ok(k));
            assert_eq!(serde_json::to_value(k).unwrap(), k.name());
        }
    }

    #[test]
    fn bad_fault_lists_name_the_item_and_the_valid_kinds() {
        let err = parse_fault_list("kill,explode").unwrap_err();
        assert_eq!(
            err,
            ParseError::UnknownFault {
                item: "explode".into()
            }
        );
        let msg = err.to_string();
        assert!(msg.contains("\"explode\""), "{msg}");
        assert!(msg.contains("wild-write") && msg.contains("link-flap, vmm-invariant, or all"));
        assert!(matches!(
            parse_fault_list("kill,,panic"),
            Err(ParseError::UnknownFault { item }) if item.is_empty()
        ));
        assert_eq!(parse_fault_list(" "), Err(ParseError::NoFaults));
        assert!("all".parse::<FaultKind>().is_err());
    }

    #[test]
    fn domain_codes_are_the_abis_and_the_vmms_own_kinds_have_none() {
        use std::collections::BTreeSet;

        assert_eq!(FaultKind::Panic.domain_code(), Some(fault::PANIC));
        assert_eq!(FaultKind::Hang.domain_code(), Some(fault::HANG));
        assert_eq!(
            FaultKind::Exception.domain_code(),
            Some(fault::INVALID_OPCODE)
        );
        assert_eq!(
            FaultKind::TripleFault.domain_code(),
            Some(fault::TRIPLE_FAULT)
        );
        assert_eq!(FaultKind::WildWrite.domain_code(), Some(fault::WILD_WRITE));
        assert_eq!(FaultKind::BogusTag.domain_code(), Some(fault::BOGUS_TAG));
        assert_eq!(FaultKind::BogusLen.domain_code(), Some(fault::BOGUS_LEN));
        assert_eq!(
            FaultKind::StaleEpoch.domain_code(),
            Some(fault::STALE_EPOCH)
        );
        assert_eq!(
            FaultKind::DmaOutside.domain_code(),
            Some(fault::DMA_OUTSIDE)
        );
        assert_eq!(FaultKind::Slow.domain_code(), Some(fault::SLOW));
        assert_eq!(FaultKind::Bitflip.domain_code(), Some(fault::BITFLIP));
        assert_eq!(
            FaultKind::FailedFlush.domain_code(),
            Some(fault::FAIL_FLUSH)
        );
        // The VMM carries these out itself (a kill, then faults on the next boots).
        for k in [
            FaultKind::Kill,
            FaultKind::DuringRecovery,
            FaultKind::FailedRestart,
            FaultKind::FailedReplay,
        ] {
            assert_eq!(k.domain_code(), None, "{k}");
        }
        // One kind per code, and never the "nothing" code.
        let codes: Vec<u32> = FaultKind::ALL
            .iter()
            .filter_map(|k| k.domain_code())
            .collect();
        assert_eq!(FaultKind::LinkFlap.domain_code(), Some(fault::LINK_FLAP));
        assert_eq!(codes.len(), 13);
        assert_eq!(codes.iter().collect::<BTreeSet<_>>().len(), codes.len());
        assert!(!codes.contains(&fault::NONE));
    }
}
