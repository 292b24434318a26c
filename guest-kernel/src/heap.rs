//! The global allocator: a linked-list heap from the end of the image to the channel (or the
//! top of RAM).

use ddvm_abi::boot::{BootInfo, Platform};
use ddvm_abi::layout::IDENTITY_MAPPED;
use linked_list_allocator::LockedHeap;

use crate::boot::image_end;

#[global_allocator]
static ALLOCATOR: LockedHeap = LockedHeap::empty();

/// Under QEMU the top of RAM may hold firmware tables the memory map does not show: keep off it.
const PVH_TOP_RESERVE: u64 = 1 << 20;

/// The heap's range for this boot info: `[image end, limit)`, where the limit is the channel
/// when there is one, else the top of RAM (below 4 GiB, minus a reserve under QEMU).
pub(crate) fn range(info: &BootInfo) -> (u64, u64) {
    let start = image_end();
    let mut end = info.mem_size.min(IDENTITY_MAPPED);
    if info.platform() == Platform::QemuPvh {
        end = end.saturating_sub(PVH_TOP_RESERVE);
    }
    if info.channel != 0 && info.channel >= start {
        end = end.min(info.channel);
    }
    (start, end.max(start))
}

/// Gives the heap its memory. Boot only.
pub(crate) fn init(info: &BootInfo) {
    let (start, end) = range(info);
    if end > start {
        // SAFETY: `[start, end)` is RAM in the identity map (boot info validated: mem_size
        // covers the image, the channel lies above the image) that nothing else uses: above the
        // image (`__image_end`) and below the channel.
        unsafe {
            ALLOCATOR
                .lock()
                .init(start as *mut u8, (end - start) as usize)
        };
    }
}

/// Bytes the heap manages.
pub fn size() -> usize {
    ALLOCATOR.lock().size()
}

/// Bytes free in the heap.
pub fn free() -> usize {
    ALLOCATOR.lock().free()
}
