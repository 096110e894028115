//! The heap: `linked_list_allocator` over the RAM between the end of the image and
//! the top of RAM.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr::{null_mut, NonNull};
use linked_list_allocator::Heap;

/// RAM left unused at the top, below `mem_size`.
const TOP_RESERVE: u64 = 64 * 1024;

extern "C" {
    /// End of the loaded image (`.bss` included), defined by `link.ld`.
    static __image_end: u8;
}

/// A `GlobalAlloc` over [`linked_list_allocator::Heap`] without a lock.
pub struct GuestHeap(UnsafeCell<Heap>);

// SAFETY: the guest has one vCPU and one thread; the only other code that runs is the
// CPL0 interrupt stubs, which never allocate. So the heap is never used concurrently.
unsafe impl Sync for GuestHeap {}

impl GuestHeap {
    /// A heap with no memory; [`GuestHeap::init`] gives it some.
    pub const fn empty() -> Self {
        GuestHeap(UnsafeCell::new(Heap::empty()))
    }

    /// Hands the RAM above the image (up to `mem_size` minus a small reserve) to the
    /// heap and returns its range.
    ///
    /// # Safety
    /// Call once, before the first allocation. `mem_size` must be the RAM size from the
    /// boot info: the range must be RAM that nothing else uses.
    pub unsafe fn init(&self, mem_size: u64) -> (u64, u64) {
        let start = core::ptr::addr_of!(__image_end) as u64;
        let start = start.next_multiple_of(4096);
        let end = mem_size.saturating_sub(TOP_RESERVE) & !4095;
        assert!(end > start + 4 * 1024 * 1024, "not enough RAM for the heap");
        // SAFETY: the caller promises this is the first use of the heap and that
        // [start, end) is unused RAM (it lies above the image, identity-mapped).
        unsafe { (*self.0.get()).init(start as *mut u8, (end - start) as usize) };
        (start, end)
    }
}

// SAFETY: allocate_first_fit returns blocks that fit the layout and do not overlap
// live blocks; deallocate gets back exactly such blocks (the GlobalAlloc contract).
unsafe impl GlobalAlloc for GuestHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: no concurrent access (see `Sync` above); the &mut lives for this call.
        let heap = unsafe { &mut *self.0.get() };
        heap.allocate_first_fit(layout)
            .map_or(null_mut(), |p| p.as_ptr())
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as in `alloc`; the caller passes a pointer `alloc` returned (non-null)
        // with the same layout.
        unsafe { (*self.0.get()).deallocate(NonNull::new_unchecked(ptr), layout) };
    }
}
