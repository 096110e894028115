//! Fuzz targets: functions that take arbitrary bytes, as a client of the control socket
//! or a replica answering ftd could send them, and check what must hold for every input.
//! They panic only when a check fails; the tests run them on generated inputs with a
//! fixed budget and `cargo xtask fuzz` under a coverage-guided engine for long runs.

use crate::control::ControlRequest;
use crate::status::ReplicaStatus;

/// A control-socket request line: parsed or refused with a one-line error; a request
/// parsed reads back from its own word.
pub fn control_request(data: &[u8]) {
    match ControlRequest::parse(data) {
        Ok(request) => assert_eq!(
            ControlRequest::parse(request.as_str().as_bytes()),
            Ok(request)
        ),
        Err(why) => assert!(!why.contains('\n'), "a multi-line error: {why:?}"),
    }
}

/// A `status` answer as ftd reads it: parsed or not, never a panic; what was parsed is
/// written as a line that reads back to the same status.
pub fn replica_status(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Some(status) = ReplicaStatus::parse(&text) else {
        return;
    };
    let line = status.to_string();
    assert!(!line.contains('\n'), "{line:?}");
    let again = ReplicaStatus::parse(&line).expect("a written status reads back");
    assert_eq!(again.to_string(), line, "writing is not stable");
}

#[cfg(test)]
mod tests {
    use proptest::collection::vec;
    use proptest::prelude::*;

    /// Lines made of the words a status has, with values that are numbers or not.
    fn status_like() -> impl Strategy<Value = Vec<u8>> {
        let key = prop_oneof![
            Just("vm"),
            Just("pid"),
            Just("role"),
            Just("state"),
            Just("generation"),
            Just("protected"),
            Just("log_bytes_total"),
            Just("log_acked_bytes"),
            Just("heartbeat_misses"),
            Just("went_live_at"),
            Just("exit_ordinal"),
        ];
        let value = prop_oneof![
            Just("primary".to_owned()),
            Just("backup".to_owned()),
            Just("running".to_owned()),
            Just("-".to_owned()),
            any::<u64>().prop_map(|n| n.to_string()),
            "[ -~]{0,12}",
        ];
        vec((key, value), 0..14).prop_map(|words| {
            words
                .iter()
                .map(|(key, value)| format!("{key}={value}"))
                .collect::<Vec<_>>()
                .join(" ")
                .into_bytes()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

        #[test]
        fn control_request(data in prop_oneof![vec(any::<u8>(), 0..300), "[a-z -]{0,12}".prop_map(String::into_bytes)]) {
            super::control_request(&data);
        }

        #[test]
        fn replica_status(data in prop_oneof![vec(any::<u8>(), 0..300), status_like()]) {
            super::replica_status(&data);
        }
    }
}
