//! Fuzz targets: functions that take arbitrary bytes, as the other end of a log channel
//! or a clone connection could send them, and check what must hold for every input. They
//! panic only when a check fails; the tests run them on generated inputs with a fixed
//! budget and `cargo xtask fuzz` under a coverage-guided engine for long runs.

use crate::channel::resume::{Hello, HELLO_LEN};
use crate::channel::{Ack, ACK_LEN};
use crate::clone::CloneHeader;
use ftvm_log::LogHeader;
use ftvm_machine::snapshot::{frame_section, restore_section, save_section, Snapshot};

/// The first bytes of `data` as a backup's hello and as an acknowledgement (raw, and with
/// a right checksum), the rest as a clone stream's header section: each decoded or
/// refused, never a panic; what decodes encodes back to what reads the same.
pub fn pair_wire(data: &[u8]) {
    let mut hello = [0u8; HELLO_LEN];
    let take = data.len().min(HELLO_LEN);
    hello[..take].copy_from_slice(&data[..take]);
    if let Ok(decoded) = Hello::decode(&hello) {
        assert_eq!(Hello::decode(&decoded.encode()), Ok(decoded));
    }
    // The same bytes with magic and checksum right, to reach the fields.
    hello[..4].copy_from_slice(b"FTLC");
    let crc = crc32fast::hash(&hello[..28]);
    hello[28..].copy_from_slice(&crc.to_le_bytes());
    if let Ok(decoded) = Hello::decode(&hello) {
        assert_eq!(Hello::decode(&decoded.encode()), Ok(decoded));
    }

    let mut ack = [0u8; ACK_LEN];
    let take = data.len().min(ACK_LEN);
    ack[..take].copy_from_slice(&data[..take]);
    for checked in [false, true] {
        if checked {
            let crc = crc32fast::hash(&ack[..24]);
            ack[24..].copy_from_slice(&crc.to_le_bytes());
        }
        if let Some(decoded) = Ack::decode(&ack) {
            assert_eq!(
                decoded.encode(),
                ack,
                "an acknowledgement reads back differently"
            );
        }
    }

    let machine = LogHeader::for_machine(b"fuzz", 2 << 20, "fuzz".into(), "");
    let fresh = || CloneHeader {
        generation: 0,
        machine: machine.clone(),
    };
    let payload = data.get(HELLO_LEN..).unwrap_or_default();
    let Ok(section) = frame_section(fresh().tag(), 1, payload) else {
        return;
    };
    let mut header = fresh();
    match restore_section(&mut header, &section) {
        Err(_) => assert_eq!(header, fresh(), "a refused clone header changed"),
        Ok(()) => {
            let saved = save_section(&header).expect("save");
            let mut again = fresh();
            restore_section(&mut again, &saved).expect("a saved clone header restores");
            assert_eq!(again, header);
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::collection::vec;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

        #[test]
        fn pair_wire(data in vec(any::<u8>(), 0..256)) {
            super::pair_wire(&data);
        }
    }
}
