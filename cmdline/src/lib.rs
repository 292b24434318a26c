//! Guest command lines, shared by the VMM and its guests so that both read them alike.
//!
//! - [`Cmdline`]: a view of whitespace-separated `key=value` and bare `flag` tokens, as a guest
//!   reads its own command line.
//! - [`workload`]: the workload client guest's arguments (`workload=randrw qd=16 ...`), parsed
//!   and checked. The guest parses its command line with it before it touches a device; the
//!   VMM checks every client's workload with it when it loads a topology, so a typo or a value
//!   out of range is an error naming the file, the client and the key instead of a guest that
//!   exits with a complaint on its console.
//! - [`hostile`]: the names of the hostile client's malformed-request cases.
//!
//! `no_std` with `alloc`: the guests have no standard library.

#![cfg_attr(not(test), no_std)]
#![deny(missing_docs)]

extern crate alloc;

pub mod hostile;
pub mod workload;

/// A parsed view of a command line.
#[derive(Clone, Copy, Debug)]
pub struct Cmdline<'a>(&'a str);

impl<'a> Cmdline<'a> {
    /// A view of `text`.
    pub const fn new(text: &'a str) -> Self {
        Cmdline(text)
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

#[cfg(test)]
mod tests {
    use super::workload::{parse, Mode};
    use super::Cmdline;

    #[test]
    fn the_last_value_of_a_key_counts_and_flags_are_bare_tokens() {
        let c = Cmdline::new("a=1 quiet a=2  b=x=y");
        assert_eq!(c.value("a"), Some("2"));
        assert_eq!(c.value("b"), Some("x=y"));
        assert!(c.flag("quiet") && !c.flag("a"));
        assert_eq!(c.parse::<u32>("a"), Some(Ok(2)));
        assert_eq!(c.parse::<u32>("b"), Some(Err("x=y")));
        assert_eq!(c.parse::<u32>("c"), None);
    }

    #[test]
    fn workloads_parse_with_their_defaults_and_unknown_tokens_are_returned() {
        let (mode, unknown) = parse(Cmdline::new(
            "workload=randread bs=8K qd=4 count=100 colour=blue",
        ))
        .unwrap();
        let Mode::Workload(w) = mode else {
            panic!("{mode:?}")
        };
        assert_eq!(
            (w.workload.name(), w.bs, w.qd, w.count),
            ("randread", 8192, 4, Some(100))
        );
        assert_eq!(unknown, ["colour=blue"]);
        let (mode, _) = parse(Cmdline::new(
            "workload=net-echo role=send peer=52:54:00:00:00:0b count=10",
        ))
        .unwrap();
        assert!(matches!(mode, Mode::NetEcho(_)), "{mode:?}");
    }

    #[test]
    fn a_bad_value_names_the_key_the_value_and_what_was_expected() {
        let e = parse(Cmdline::new("workload=randrw rwmix=101")).unwrap_err();
        assert_eq!(e.key, "rwmix");
        assert_eq!(e.value, "101");
        assert!(e.to_string().starts_with("rwmix=101: expected"), "{e}");
        let e = parse(Cmdline::new("hostile=nonsense")).unwrap_err();
        assert!(e.to_string().contains("desc-loop"), "{e}");
    }
}
