//! ftvmm: the KVM virtual machine monitor of one ftvm replica.
//!
//! It runs an "FT-ready" guest (docs/machine.md) whose execution depends only on its
//! initial state and on inputs the VMM delivers at guest-caused exits, so that a second
//! replica fed the same inputs at the same exit ordinals executes the same instructions.
//!
//! ```no_run
//! use ftvmm::devices::serial::Console;
//! use ftvmm::vm::{DigestConfig, InputsConfig, Vm, VmConfig, VmOutcome};
//!
//! let config = VmConfig {
//!     image: "target/guest/hello.elf".into(),
//!     mem_size: 64 << 20,
//!     cmdline: "ticks=3".into(),
//!     console: Console::Sink,
//!     disk: None,
//!     net: None,
//!     inputs: InputsConfig::Live,
//!     digests: DigestConfig::default(),
//! };
//! let mut vm = Vm::new(config)?;
//! match vm.run()? {
//!     VmOutcome::PowerOff(code) => println!("guest exited with {code}"),
//!     VmOutcome::Crashed(report) => println!("{report}"),
//!     other => println!("{other:?}"),
//! }
//! # Ok::<(), ftvmm::vm::VmError>(())
//! ```

pub mod arbiter;
pub mod channel;
pub mod clock;
pub mod clone;
pub mod control;
pub mod devices;
pub mod ftlog;
pub mod inputs;
pub mod interrupts;
pub mod layout;
pub mod loader;
pub mod memory;
pub mod outcome;
pub mod replay;
pub mod signals;
pub mod size;
pub mod snapshot;
pub mod vcpu;
pub mod vm;
