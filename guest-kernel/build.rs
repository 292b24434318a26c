//! Publishes the absolute path of `link.ld` to the build scripts of the images that depend on
//! this crate, as `DEP_DDVM_GUEST_KERNEL_LINKER_SCRIPT` (a library's own link arguments do not
//! reach the final link; the image's build script passes `-T` for its binary).

use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let script = dir.join("link.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:linker_script={}", script.display());
}
