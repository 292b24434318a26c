//! The command line: whitespace-separated `key=value` and bare `flag` tokens.

use crate::boot;

/// The command line (empty when absent or not UTF-8).
pub fn cmdline() -> &'static str {
    core::str::from_utf8(boot::cmdline_bytes()).unwrap_or("")
}

/// A parsed view of a command line.
#[derive(Clone, Copy, Debug)]
pub struct Cmdline<'a>(&'a str);

impl<'a> Cmdline<'a> {
    /// A view of `text`.
    pub const fn new(text: &'a str) -> Self {
        Cmdline(text)
    }

    /// The image's own command line.
    pub fn get() -> Cmdline<'static> {
        Cmdline(cmdline())
    }

    /// The whole text.
    pub fn as_str(&self) -> &'a str {
        self.0
    }

    /// The tokens, in order.
    pub fn tokens(&self) -> impl Iterator<Item = &'a str> {
        self.0.split_ascii_whitespace()
    }

    /// The value of the last `key=value` token for `key`.
    pub fn value(&self, key: &str) -> Option<&'a str> {
        self.tokens()
            .filter_map(|t| t.split_once('='))
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v)
            .last()
    }

    /// Whether the bare token `name` is present.
    pub fn flag(&self, name: &str) -> bool {
        self.tokens().any(|t| t == name)
    }

    /// The value for `key` parsed as `T`: `None` when absent, `Some(Err(text))` when it does not
    /// parse.
    pub fn parse<T: core::str::FromStr>(&self, key: &str) -> Option<Result<T, &'a str>> {
        self.value(key).map(|v| v.parse().map_err(|_| v))
    }
}
