//! The virtio transport contract of uvirtio.
//!
//! Every transport (vhost-user, vhost-vdpa, virtio-pci over VFIO) implements
//! [`Transport`]; every device crate is generic over it. This crate also holds
//! what they share:
//!
//! * [`VirtioFeatures`] and [`DeviceStatus`], the typed feature and status bits;
//! * [`negotiate`], [`read_config`] and [`driver_ok`], the generic steps of
//!   device initialisation (virtio 1.2 §3.1.1);
//! * [`Error`]: one error type that says which transport, which [`Step`] and
//!   which [`Cause`];
//! * [`EventFd`], the [`Notifier`] trait and [`CompletionEvent`], for kicks and
//!   used-buffer notifications;
//! * [`IovaAllocator`], device addresses inside the windows an IOMMU allows;
//! * [`DmaRegion`] (device-visible memory) and [`MemFd`] (shared, file-backed
//!   memory for backends in other processes);
//! * with the feature `loopback`, `loopback::LoopbackTransport`: an in-process
//!   transport whose device is the core's device model plus a device-specific
//!   `loopback::LoopbackDevice`, for unit tests and instruction-count
//!   benchmarks of device crates with no backend at all.
//!
//! Hot paths use the associated [`Transport::Notifier`] type and the concrete
//! [`CompletionEvent`]: no dynamic dispatch and no allocation per request.

pub mod dma;
pub mod error;
pub mod event;
pub mod features;
pub mod hangup;
pub mod iova;
#[cfg(feature = "loopback")]
pub mod loopback;
pub mod memfd;
pub mod transport;

pub use dma::DmaRegion;
pub use error::{Cause, Error, Result, Step};
pub use event::{Cleared, CompletionEvent, EventFd, Notifier, Wait};
pub use features::{DeviceStatus, VirtioFeatures};
pub use hangup::Hangup;
pub use iova::{IovaAllocator, IovaError};
pub use memfd::MemFd;
pub use transport::{
    driver_ok, negotiate, read_config, read_config_bytes, QueueSetup, Transport, CONFIG_READ_ATTEMPTS,
};
pub use virtio_queue_core::{QueueAddresses, RingFormat};
