//! A static cell for the guest's little global state. The guest runs on one vCPU with interrupts off, so
//! there is no concurrent access; this only makes that assumption explicit in one place.

use core::cell::UnsafeCell;

pub struct Global<T>(UnsafeCell<T>);

// SAFETY: single vCPU, no interrupts, no re-entrancy except the fault path, which only reads.
unsafe impl<T> Sync for Global<T> {}

impl<T: Copy> Global<T> {
    pub const fn new(value: T) -> Self {
        Global(UnsafeCell::new(value))
    }

    pub fn get(&self) -> T {
        // SAFETY: see the Sync impl.
        unsafe { *self.0.get() }
    }

    pub fn set(&self, value: T) {
        // SAFETY: see the Sync impl.
        unsafe { *self.0.get() = value }
    }
}
