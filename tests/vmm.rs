//! ftvmm on real KVM with the sample guests: boot, console, clock, timer, exit codes, and
//! guests that misbehave.

use ftvm_tests::{binary, field, ftvmm_run, guest, run, Ran};
use std::process::Command;

/// The hello guest's checksum, computed here the way the guest computes it at CPL3.
fn expected_checksum(iterations: u64) -> u64 {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut acc: u64 = 0xCBF2_9CE4_8422_2325;
    for _ in 0..iterations {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        acc = (acc ^ x.wrapping_mul(0x2545_F491_4F6C_DD1D)).wrapping_mul(0x0000_0100_0000_01B3);
    }
    acc
}

fn line_value<'a>(stdout: &'a str, prefix: &str) -> &'a str {
    stdout
        .lines()
        .find_map(|line| line.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in console output:\n{stdout}"))
}

fn assert_one_line_error(ran: &Ran, code: i32, needle: &str) {
    assert_eq!(ran.code, Some(code), "{ran:?}");
    assert_eq!(
        ran.stderr.trim_end().lines().count(),
        1,
        "expected one line: {ran:?}"
    );
    assert!(ran.stderr.starts_with("ftvmm: "), "{ran:?}");
    assert!(ran.stderr.contains(needle), "expected {needle:?}: {ran:?}");
    assert!(!ran.stderr.contains("panicked"), "{ran:?}");
}

#[test]
fn hello_guest_boots_prints_and_exits_with_the_code_it_asked_for() {
    let ran = ftvmm_run("hello", "ticks=2 work=100000 exit=7", &[]);
    assert_eq!(ran.code, Some(7), "{ran:?}");
    assert!(
        ran.stdout.starts_with("hello from the ftvm guest\n"),
        "{ran:?}"
    );
    assert_eq!(line_value(&ran.stdout, "bye "), "(exit 7)");
    assert!(ran.stderr.is_empty(), "{ran:?}");
}

#[test]
fn cpu_bound_user_mode_work_computes_the_right_checksum() {
    let work = 3_000_000;
    let ran = ftvmm_run("hello", &format!("ticks=1 work={work}"), &[]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let printed = line_value(&ran.stdout, "checksum: 0x");
    assert_eq!(
        u64::from_str_radix(printed, 16).ok(),
        Some(expected_checksum(work))
    );
}

#[test]
fn clock_advances_and_halted_guest_is_woken_by_each_timer_tick() {
    let (ticks, tick_us) = (5u64, 4000u64);
    let ran = ftvmm_run(
        "hello",
        &format!("ticks={ticks} tick_us={tick_us} work=0"),
        &["--stats"],
    );
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let clock: u64 = line_value(&ran.stdout, "clock: ")
        .parse()
        .expect("clock is a number");
    assert!(
        clock > 0,
        "the clock starts at VM creation and has advanced by the first read"
    );
    let waited = line_value(&ran.stdout, "ticks: ");
    assert_eq!(
        field(waited, "ticks"),
        None,
        "format is 'ticks: N elapsed_ns: E'"
    );
    let mut words = waited.split_whitespace();
    assert_eq!(words.next().and_then(|n| n.parse().ok()), Some(ticks));
    let elapsed: u64 = words
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("elapsed_ns value");
    // The timer was started just before the first clock read, so N ticks take at least
    // (N - 1) whole periods of guest-visible time.
    assert!(
        elapsed >= (ticks - 1) * tick_us * 1000,
        "elapsed {elapsed} ns for {ticks} ticks of {tick_us} us"
    );
    assert!(elapsed < 5_000_000_000, "5 ticks of 4 ms took {elapsed} ns");
    // The waiting was done halted, and every tick was injected at an exit.
    let hlt = field(&ran.stderr, "hlt").expect("stats line");
    let injected = field(&ran.stderr, "injected").expect("stats line");
    assert!(hlt >= ticks, "{}", ran.stderr);
    assert!(injected >= ticks, "{}", ran.stderr);
    assert_eq!(
        field(&ran.stderr, "exit_ordinal"),
        Some(
            [
                "pio_out",
                "pio_in",
                "mmio_read",
                "mmio_write",
                "hlt",
                "irq_window"
            ]
            .iter()
            .map(|kind| field(&ran.stderr, kind).expect("counter"))
            .sum()
        ),
        "the ordinal counts exactly the guest-caused exits: {}",
        ran.stderr
    );
}

#[test]
fn console_can_go_to_a_file() {
    let dir = std::env::temp_dir().join(format!("ftvm-console-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let console = dir.join("console.log");
    ftvm_tests::require_kvm();
    let ran = run(Command::new(binary("ftvmm"))
        .args(["run", "--cmdline", "ticks=1 work=0", "--console"])
        .arg(&console)
        .arg("--image")
        .arg(guest("hello")));
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(ran.stdout.is_empty(), "console went to stdout: {ran:?}");
    let text = std::fs::read_to_string(&console).expect("console file");
    assert!(text.starts_with("hello from the ftvm guest\n"), "{text}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn exit_code_is_the_low_byte_of_the_power_port_write() {
    let ran = ftvmm_run("evil", "case=bad-exit", &[]);
    assert_eq!(ran.code, Some(300 & 0xFF), "{ran:?}");
}

#[test]
fn triple_fault_is_reported_with_rip_and_ordinal() {
    let ran = ftvmm_run("evil", "case=triple-fault", &[]);
    assert_one_line_error(&ran, 70, "guest crashed: triple fault");
    assert!(
        ran.stderr.contains("rip 0x") && ran.stderr.contains("exit ordinal "),
        "{ran:?}"
    );
}

#[test]
fn jump_to_memory_without_ram_is_reported_not_fatal_to_the_vmm() {
    let ran = ftvmm_run("evil", "case=wild-jump", &[]);
    assert_one_line_error(&ran, 70, "could not emulate");
    assert!(ran.stderr.contains("rip 0xc8000000"), "{ran:?}");
}

#[test]
fn jump_to_unmapped_address_is_a_reported_page_fault() {
    let ran = ftvmm_run("evil", "case=unmapped-jump", &[]);
    assert_one_line_error(&ran, 70, "unhandled exception 14 #PF");
    assert!(ran.stderr.contains("cr2 0x1000000000"), "{ran:?}");
}

#[test]
fn halt_with_interrupts_disabled_is_reported_as_a_hang() {
    let ran = ftvmm_run("evil", "case=halt-no-irq", &[]);
    assert_one_line_error(&ran, 70, "halted with interrupts disabled");
}

#[test]
fn garbage_written_to_every_port_and_mmio_leaves_vmm_and_guest_running() {
    let ran = ftvmm_run("evil", "case=garbage-ports", &["--stats"]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(ran.stdout.contains("survived garbage"), "{ran:?}");
    assert!(
        field(&ran.stderr, "unhandled").is_some_and(|n| n > 1000),
        "{ran:?}"
    );
}

#[test]
fn missing_image_is_a_one_line_error() {
    let ran = run(Command::new(binary("ftvmm")).args(["run", "--image", "/nonexistent/guest.elf"]));
    assert_one_line_error(&ran, 66, "cannot read image /nonexistent/guest.elf");
}

#[test]
fn malformed_images_are_one_line_errors() {
    let dir = std::env::temp_dir().join(format!("ftvm-images-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let hello = std::fs::read(guest("hello")).expect("hello image");
    let cases: [(&str, Vec<u8>, &str); 3] = [
        ("text", b"just some text\n".to_vec(), "no ELF magic"),
        (
            "truncated",
            hello[..hello.len().min(200)].to_vec(),
            "past the end of the file",
        ),
        ("empty", Vec::new(), "no ELF magic"),
    ];
    for (name, bytes, needle) in cases {
        let path = dir.join(name);
        std::fs::write(&path, bytes).expect("write image");
        let ran = run(Command::new(binary("ftvmm"))
            .args(["run", "--image"])
            .arg(&path));
        assert_one_line_error(&ran, 65, needle);
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn bad_flags_and_sizes_are_one_line_usage_errors() {
    let image = guest("hello");
    let image = image.to_str().expect("utf-8 path");
    for (args, needle) in [
        (
            vec!["run", "--image", image, "--bogus"],
            "unexpected argument '--bogus'",
        ),
        (
            vec!["run", "--image", image, "--mem", "1M"],
            "outside the supported guest memory range",
        ),
        (
            vec!["run", "--image", image, "--mem", "3G1"],
            "is not a size",
        ),
        (
            vec!["run", "--image", image, "--mem", "64M", "--mem", "8G"],
            "--mem",
        ),
        (vec!["run"], "--image"),
        // No default arbiter: two hosts started by hand must never each decide alone.
        (
            vec![
                "run",
                "--image",
                image,
                "--role",
                "primary",
                "--vm",
                "w1",
                "--log-listen",
                "127.0.0.1:0",
            ],
            "need --arbiter",
        ),
        (
            vec![
                "run",
                "--image",
                image,
                "--vm",
                "w1",
                "--clone-listen",
                "127.0.0.1:0",
            ],
            "need --arbiter",
        ),
        (
            vec![
                "run",
                "--image",
                image,
                "--mac",
                "01:00:5e:00:00:01",
                "--tap",
                "t0",
            ],
            "multicast",
        ),
    ] {
        let ran = run(Command::new(binary("ftvmm")).args(&args));
        assert_one_line_error(&ran, 64, needle);
    }
}

#[test]
fn sigterm_stops_the_vm_gracefully_with_stats() {
    ftvm_tests::require_kvm();
    let child = Command::new(binary("ftvmm"))
        .args([
            "run",
            "--console",
            "none",
            "--stats",
            "--cmdline",
            "ticks=1000000",
        ])
        .arg("--image")
        .arg(guest("hello"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start ftvmm");
    std::thread::sleep(std::time::Duration::from_millis(300));
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let out = child.wait_with_output().expect("wait ftvmm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM), "{stderr}");
    assert!(
        field(&stderr, "hlt").is_some_and(|halts| halts > 10),
        "{stderr}"
    );
}
