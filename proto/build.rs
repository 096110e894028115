//! Generates the Rust types and tonic client/server of `ft/v1/ftvm.proto`.

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    println!("cargo:rerun-if-changed=ft/v1/ftvm.proto");
    println!("cargo:rerun-if-env-changed=PROTOC");
    let protoc = std::env::var_os("PROTOC").unwrap_or_else(|| "protoc".into());
    if std::process::Command::new(&protoc)
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "error: protoc ({}) is needed to build ftvm-proto and was not found: \
             install it with `apt-get install protobuf-compiler` (or `cargo xtask setup`), \
             or point PROTOC at it",
            Path::new(&protoc).display()
        );
        return ExitCode::FAILURE;
    }
    match tonic_prost_build::configure().compile_protos(&["ft/v1/ftvm.proto"], &["."]) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: cannot compile ft/v1/ftvm.proto: {err}");
            ExitCode::FAILURE
        }
    }
}
