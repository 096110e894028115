//! The ftvm machine: the KVM virtual machine of one replica, deterministic between
//! guest-caused exits, with every nondeterministic input recorded or replayed.
//!
//! It runs an "FT-ready" guest (docs/machine.md) whose execution depends only on its
//! initial state and on inputs the VMM delivers at guest-caused exits, so that a second
//! replica fed the same inputs at the same exit ordinals executes the same instructions.
//!
//! ```no_run
//! use ftvm_machine::devices::serial::Console;
//! use ftvm_machine::vm::{DigestConfig, InputsConfig, Vm, VmConfig, VmOutcome};
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
//! match vm.run(&mut ftvm_machine::vm::NoHook)? {
//!     VmOutcome::PowerOff(code) => println!("guest exited with {code}"),
//!     VmOutcome::Crashed(report) => println!("{report}"),
//!     other => println!("{other:?}"),
//! }
//! # Ok::<(), ftvm_machine::vm::VmError>(())
//! ```

pub mod clock;
pub mod devices;
pub mod fuzz;
pub mod inputs;
pub mod interrupts;
pub mod layout;
pub mod link;
pub mod loader;
pub mod memory;
pub mod outcome;
pub mod private_file;
pub mod replay;
pub mod signals;
pub mod snapshot;
pub mod vcpu;
pub mod vm;
