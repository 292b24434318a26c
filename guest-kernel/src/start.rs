//! The common 64-bit boot path, after either entry.

use crate::arch::entry::ENTRY_PVH;
use crate::{arch, boot, console, heap, time};

extern "Rust" {
    /// The application's main, defined by [`crate::entry_point!`].
    fn __ddvm_guest_main() -> !;
}

/// Called by both entries on the boot stack with `.bss` zeroed. `arg` is the boot info address
/// (ddvm) or the `hvm_start_info` address (PVH); `magic` is `rsi` at the ddvm entry.
pub(crate) extern "sysv64" fn kernel_entry(arg: u64, magic: u64, entry: u64) -> ! {
    arch::descriptors::load();
    let taken = if entry == ENTRY_PVH {
        boot::init_pvh(arg)
    } else {
        boot::init_ddvm(arg, magic)
    };
    if let Err(e) = taken {
        // The console is still the serial port and the panic record is at its default address.
        panic!("refusing to boot: {e}");
    }
    console::init(boot::info());
    heap::init(boot::info());
    time::init(boot::info());
    // SAFETY: `entry_point!` defines this symbol with this signature; an image without it does
    // not link.
    unsafe { __ddvm_guest_main() }
}

/// Declares the image's main function, called once boot is complete (console, heap, clock and
/// boot info ready). It must not return: finish with [`crate::vmm::exit`].
///
/// ```ignore
/// guest_kernel::entry_point!(main);
/// fn main() -> ! { guest_kernel::vmm::exit(0) }
/// ```
#[macro_export]
macro_rules! entry_point {
    ($main:path) => {
        #[allow(unsafe_code)]
        #[export_name = "__ddvm_guest_main"]
        fn __ddvm_guest_main() -> ! {
            let main: fn() -> ! = $main;
            main()
        }
    };
}
