//! The control protocol: one request line as the control socket reads it, answered by
//! `ddvm::control::handle` for a VMM without domains (every name is unknown) that can stop.
//!
//! Input: the request line (bytes, made UTF-8 as the server makes them).
//!
//! Checked: the answer is a JSON object with a boolean `ok` and, when not ok, an error
//! string; it survives serialisation and parsing unchanged (what the client reads is what
//! was meant); `ok` is true only for a request that parses, and a stop request sets the
//! stop flag and nothing else does.

use ddvm::control::handle;
use ddvm::stop::Stop;
use serde_json::Value;

use crate::Seed;

/// Runs one input.
pub fn run(data: &[u8]) {
    let line = String::from_utf8_lossy(data);
    let line = line.trim();
    let stop = Stop::new();
    let answer = handle(line, &[], Some(&stop));
    let Value::Object(fields) = &answer else {
        panic!("answer is not an object: {answer}");
    };
    let ok = fields
        .get("ok")
        .and_then(Value::as_bool)
        .unwrap_or_else(|| panic!("answer without a boolean ok: {answer}"));
    if !ok {
        assert!(
            fields.get("error").is_some_and(Value::is_string),
            "refusal without an error: {answer}"
        );
    }
    let text = answer.to_string();
    assert!(!text.contains('\n'), "an answer is one line");
    let again: Value = serde_json::from_str(&text).expect("the answer parses");
    assert_eq!(again, answer);
    let parsed: Result<Value, _> = serde_json::from_str(line);
    if ok {
        let cmd = parsed
            .as_ref()
            .ok()
            .and_then(|v| v.get("cmd"))
            .and_then(Value::as_str);
        assert!(
            matches!(cmd, Some("status" | "events" | "stop")),
            "ok for {line:?}"
        );
    }
    assert_eq!(
        stop.requested(),
        ok && fields.get("stopping").is_some(),
        "the stop flag follows the stop request alone"
    );
}

/// Seeds: every request of the protocol.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    [
        ("status", r#"{"cmd":"status"}"#),
        ("events", r#"{"cmd":"events","since":3}"#),
        ("kill", r#"{"cmd":"kill","domain":"nvme0"}"#),
        ("restart", r#"{"cmd":"restart","domain":"nic0"}"#),
        (
            "update",
            r#"{"cmd":"update","domain":"nvme0","image":"/nonexistent/dd.elf"}"#,
        ),
        (
            "inject",
            r#"{"cmd":"inject","domain":"nvme0","fault":"bogus-tag","arg":2}"#,
        ),
        ("stop", r#"{"cmd":"stop"}"#),
        ("unknown", r#"{"cmd":"reboot","extra":[1,2.5e3,null]}"#),
    ]
    .into_iter()
    .map(|(n, l)| (n.to_string(), Seed::new().bytes(l.as_bytes()).finish()))
    .collect()
}
