//! Links the image with guest-kernel's linker script (load address, entry, PVH note).

fn main() {
    let script = std::env::var("DEP_DDVM_GUEST_KERNEL_LINKER_SCRIPT")
        .expect("guest-kernel publishes its linker script (links = \"ddvm_guest_kernel\")");
    println!("cargo:rerun-if-changed={script}");
    println!("cargo:rustc-link-arg-bins=-T{script}");
}
