//! The driver side of virtio virtqueues, for user-space drivers, operating
//! systems and firmware.
//!
//! `no_std`, no `alloc`, no panicking paths reachable from device input. Ring
//! memory and per-chain driver state are given by the caller; the device is
//! not trusted: every value it writes is checked, and a violation breaks the
//! queue with a [`DeviceError`] instead of corrupting driver state.
//!
//! * [`layout`]: the ring structures of virtio 1.2 and where they live.
//! * [`shared`]: the only code that touches device-visible memory.
//! * [`SplitQueue`] and [`PackedQueue`]: driver-side queues of both formats;
//!   [`Virtqueue`] wraps either behind one statically dispatched type.
//! * [`UsedIdHint`]: looking ahead at used entries not taken yet, to prefetch
//!   the memory of their requests.
//! * `device` (feature `device-model`): a device side of both formats that can
//!   misbehave on purpose, for tests, fuzzing, loom models and benchmarks.
//!
//! # Example: a queue without a heap
//!
//! The ring lives in a `static` (device-visible memory; on an identity-mapped
//! system its address is its device address) and the queue owns its slots.
//!
//! ```
//! use virtio_queue_core::layout::{ring_lines, RingFormat, RingFeatures};
//! use virtio_queue_core::{Buffer, OwnedSplitQueue, QueueConfig, SharedLine, SharedMemory, Slot, SplitQueue};
//!
//! const SIZE: u16 = 16;
//! static RING: [SharedLine; ring_lines(RingFormat::Split, SIZE)] =
//!     [SharedLine::ZERO; ring_lines(RingFormat::Split, SIZE)];
//!
//! let ring = SharedMemory::new(&RING);
//! let config = QueueConfig {
//!     queue_size: SIZE,
//!     ring,
//!     ring_iova: ring.as_ptr() as u64,
//!     features: RingFeatures::EVENT_IDX,
//!     indirect: None,
//! };
//! let mut queue: OwnedSplitQueue<'_, u32, 16> = SplitQueue::new(config, Slot::array()).unwrap();
//! let header = [Buffer::new(0x8000, 16)];
//! let data_and_status = [Buffer::new(0x9000, 4096), Buffer::new(0xa000, 1)];
//! queue.add(&header, &data_and_status, 7).unwrap();
//! let must_notify = queue.publish().unwrap(); // one release store for the batch
//! assert!(must_notify); // the device has not asked for silence
//! assert_eq!(queue.pop_used().unwrap(), None); // nothing used yet
//! assert_eq!(queue.in_flight(), 1);
//! ```
#![cfg_attr(not(any(loom, test)), no_std)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing))]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod layout;
pub mod shared;

mod error;
mod frame;
mod lookahead;
mod notify;
mod slots;

pub mod packed;
pub mod split;
pub mod virtqueue;

#[cfg(feature = "device-model")]
pub mod device;

pub use error::{AddError, DeviceError, Error};
pub use frame::ChainFrame;
pub use layout::{LayoutError, RingFeatures, RingFormat, RingLayout};
pub use lookahead::UsedIdHint;
pub use notify::UsedDelay;
pub use packed::{OwnedPackedQueue, PackedQueue};
pub use shared::{SharedLine, SharedMemory};
pub use slots::{IndirectTables, Slot, SlotStorage};
pub use split::{OwnedSplitQueue, QueueConfig, SplitQueue};
pub use virtqueue::{DriverQueue, Virtqueue};

/// One buffer of a chain: a device address and a length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    /// Device address (IOVA) of the first byte.
    pub addr: u64,
    /// Length in bytes; must not be zero.
    pub len: u32,
}

impl Buffer {
    /// A buffer of `len` bytes at device address `addr`.
    pub const fn new(addr: u64, len: u32) -> Self {
        Buffer { addr, len }
    }
}

/// A chain the device has finished with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used<T> {
    /// The token given when the chain was added.
    pub token: T,
    /// Bytes the device says it wrote into the chain's writable buffers,
    /// checked to be at most their total length. Under VIRTIO_F_IN_ORDER a
    /// device may report a batch with one used entry; the chains before the
    /// last of such a batch report their whole writable length.
    pub len: u32,
}

/// Where the three parts of a queue are in device address space, for the
/// transport to program into the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueAddresses {
    /// Descriptor area (split: descriptor table; packed: descriptor ring).
    pub desc: u64,
    /// Driver area (split: available ring; packed: driver event suppression).
    pub driver: u64,
    /// Device area (split: used ring; packed: device event suppression).
    pub device: u64,
}
