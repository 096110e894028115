//! Helpers the snapshot tests of every component share (also for the tests of other
//! crates, with the `test-util` feature): round trips, and refusal of damaged sections.

use super::*;

/// Saves `source`, restores the bytes into `target`, saves `target` again: the two saves
/// must be identical. Returns the bytes.
pub fn assert_round_trip(source: &dyn Snapshot, target: &mut dyn Snapshot) -> Vec<u8> {
    let saved = save_section(source).expect("save");
    restore_section(target, &saved).expect("restore");
    let again = save_section(target).expect("save again");
    assert_eq!(
        saved,
        again,
        "section {} changed in a save -> restore -> save round trip",
        tag_name(&source.tag())
    );
    saved
}

/// Every truncation, every single-bit flip and an extra trailing byte of a good section
/// must be refused, and a refused section must leave a fresh component unchanged.
pub fn assert_refuses_damage<T: Snapshot>(bytes: &[u8], fresh: impl Fn() -> T) {
    let untouched = save_section(&fresh()).expect("save a fresh component");
    check_damage(bytes, |damaged, how| {
        let mut target = fresh();
        assert!(
            restore_section(&mut target, damaged).is_err(),
            "{how} was accepted"
        );
        assert_eq!(
            save_section(&target).expect("save"),
            untouched,
            "{how} was refused but changed the component"
        );
    });
}

/// As [`assert_refuses_damage`], for a component whose saved state moves by itself (a
/// clock): only the refusal is checked.
pub fn assert_refuses_damage_of_moving<T: Snapshot>(bytes: &[u8], fresh: impl Fn() -> T) {
    check_damage(bytes, |damaged, how| {
        assert!(
            restore_section(&mut fresh(), damaged).is_err(),
            "{how} was accepted"
        );
    });
}

fn check_damage(bytes: &[u8], check: impl Fn(&[u8], &str)) {
    for len in 0..bytes.len() {
        check(&bytes[..len], &format!("a section cut to {len} bytes"));
    }
    for at in 0..bytes.len() {
        for bit in [0u8, 3, 7] {
            let mut damaged = bytes.to_vec();
            damaged[at] ^= 1 << bit;
            check(&damaged, &format!("bit {bit} of byte {at} flipped"));
        }
    }
    let mut longer = bytes.to_vec();
    longer.push(0);
    check(&longer, "a trailing byte");
}
