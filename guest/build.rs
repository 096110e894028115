//! Passes the guest linker script to the linker of every binary.

fn main() {
    // CARGO_MANIFEST_DIR is always set by cargo for build scripts.
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".to_owned());
    println!("cargo:rustc-link-arg-bins=-T{dir}/link.ld");
    println!("cargo:rerun-if-changed=link.ld");
    println!("cargo:rerun-if-changed=build.rs");
}
