//! The command line: whitespace-separated `key=value` and bare `flag` tokens ([`Cmdline`],
//! shared with the VMM).

use crate::boot;

pub use ddvm_cmdline::Cmdline;

/// The command line (empty when absent or not UTF-8).
pub fn cmdline() -> &'static str {
    core::str::from_utf8(boot::cmdline_bytes()).unwrap_or("")
}

/// The image's own command line.
pub fn get() -> Cmdline<'static> {
    Cmdline::new(cmdline())
}
