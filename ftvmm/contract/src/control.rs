//! The requests of a replica's control socket: one line, answered with one line (or the
//! Prometheus text for `metrics`) and the connection closed.

/// Longest request line the socket reads.
pub const MAX_REQUEST: usize = 256;

/// A control-socket request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlRequest {
    /// The replica's [`crate::status::ReplicaStatus`] line.
    Status,
    /// Its metrics, in the Prometheus text format.
    Metrics,
    /// Stop gracefully (as SIGTERM).
    Stop,
    /// Stop, only if it is a backup still following its primary.
    StopBackup,
}

impl ControlRequest {
    /// Every request.
    pub const ALL: [ControlRequest; 4] = [
        ControlRequest::Status,
        ControlRequest::Metrics,
        ControlRequest::Stop,
        ControlRequest::StopBackup,
    ];

    /// The request's word on the socket.
    pub fn as_str(self) -> &'static str {
        match self {
            ControlRequest::Status => "status",
            ControlRequest::Metrics => "metrics",
            ControlRequest::Stop => "stop",
            ControlRequest::StopBackup => "stop-backup",
        }
    }

    /// Parses a request line (without its newline; surrounding blanks are ignored).
    /// The error says what was wrong, with the line made printable and cut short.
    pub fn parse(line: &[u8]) -> Result<ControlRequest, String> {
        if line.len() > MAX_REQUEST {
            return Err(format!("request longer than {MAX_REQUEST} bytes"));
        }
        let text = String::from_utf8_lossy(line);
        let word = text.trim();
        ControlRequest::ALL
            .into_iter()
            .find(|request| request.as_str() == word)
            .ok_or_else(|| {
                format!(
                    "unknown command '{}' (expected status, metrics, stop or stop-backup)",
                    printable(word)
                )
            })
    }
}

/// `text` cut short and with control characters replaced, for an error line.
fn printable(text: &str) -> String {
    let mut out: String = text
        .chars()
        .take(40)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if text.chars().count() > 40 {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_reads_back_and_others_are_named_in_the_error() {
        for request in ControlRequest::ALL {
            assert_eq!(
                ControlRequest::parse(request.as_str().as_bytes()),
                Ok(request)
            );
            let padded = format!("  {} \r", request.as_str());
            assert_eq!(ControlRequest::parse(padded.as_bytes()), Ok(request));
        }
        let err = ControlRequest::parse(b"reboot\x07now").unwrap_err();
        assert!(err.contains("'reboot?now'"), "{err}");
        assert!(ControlRequest::parse(&[b'x'; 300])
            .unwrap_err()
            .contains("longer than"));
    }
}
