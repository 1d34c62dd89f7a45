//! The pure parts of the virtio driver, as the host-side crate (../../src/lib.rs) includes them: only
//! `core` logic with unit tests there. The guest itself declares these modules in mod.rs.

pub mod blk;
pub mod caps;
pub mod dma;
pub mod net;
pub mod ring;
