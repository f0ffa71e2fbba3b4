//! A vhost-vdpa transport: a virtio device behind `/dev/vhost-vdpa-N` (a
//! hardware vDPA device, the kernel's `vdpa_sim` simulator, or a VDUSE device
//! served by a user-space daemon), driven through the `vhost` crate's
//! vhost-vdpa backend.
//!
//! * [`VdpaTransport::open`] takes the device (vhost-vdpa allows one opener),
//!   acks the backend features `IOTLB_MSG_V2 | IOTLB_BATCH | IOTLB_PERSIST` as
//!   offered, and reads the device id, config size, queue count
//!   (`VHOST_VDPA_GET_VQS_COUNT`), queue size (`VHOST_VDPA_GET_VRING_NUM`) and
//!   IOVA window (`VHOST_VDPA_GET_IOVA_RANGE`).
//! * The virtio status goes through `VHOST_VDPA_SET_STATUS`/`GET_STATUS`, so
//!   [`virtio_transport_api::negotiate`] and [`virtio_transport_api::driver_ok`]
//!   drive the device itself (reset = status 0; FEATURES_OK is read back from
//!   the device).
//! * Device addresses are IOVAs from an
//!   [`IovaAllocator`](virtio_transport_api::IovaAllocator) over the device's
//!   window, mapped with vhost IOTLB messages (see [Memory](#memory)).
//! * Each queue gets a kick eventfd (the [`Transport::Notifier`]) and a call
//!   eventfd (its [`CompletionEvent`](virtio_transport_api::CompletionEvent)).
//! * Config reads past `VHOST_VDPA_GET_CONFIG_SIZE` are refused before the
//!   ioctl; the config generation counts the config-change eventfd's signals
//!   (`VHOST_VDPA_SET_CONFIG_CALL`), since vhost-vdpa has no generation ioctl.
//!
//! # Memory
//!
//! **Memory handed to the device must be shared and file-backed (memfd).** In
//! VA mode (`use_va=1`, VDUSE) the kernel walks the process's VMAs on each
//! IOTLB update and silently maps nothing for anonymous or private memory. So
//! [`Transport::alloc_dma`] hands out shared memfd mappings, and
//! [`Transport::map_memory`] reads `/proc/self/maps` (at map time, not per
//! request) and refuses, with a [`Cause::InvalidArgument`] saying what it
//! found, any range that is not wholly a `MAP_SHARED` mapping of the given
//! descriptor at the given offset. PA-mode parents (`use_va=0`) pin the pages
//! instead; memfd memory works there too, and the pinned pages count against
//! `RLIMIT_MEMLOCK`.
//!
//! Dropping a [`DmaRegion`](virtio_transport_api::DmaRegion) invalidates its
//! IOTLB entry and frees its IOVA; dropping the transport resets the device
//! and invalidates every mapping still there.
//!
//! ```no_run
//! use transport_vdpa::VdpaTransport;
//! use virtio_transport_api::Transport;
//!
//! let mut t = VdpaTransport::open("/dev/vhost-vdpa-0")?;
//! assert_eq!(t.device_id(), 2, "a block device");
//! let features = virtio_transport_api::negotiate(&mut t, 0, 0)?;
//! let region = t.alloc_dma(4096)?;
//! println!("negotiated {features:#x}; 4 KiB at IOVA {:#x}", region.iova());
//! # Ok::<(), virtio_transport_api::Error>(())
//! ```
//!
//! [`Cause::InvalidArgument`]: virtio_transport_api::Cause::InvalidArgument
//! [`Transport::Notifier`]: virtio_transport_api::Transport::Notifier
//! [`Transport::alloc_dma`]: virtio_transport_api::Transport::alloc_dma
//! [`Transport::map_memory`]: virtio_transport_api::Transport::map_memory

mod backend;
mod config;
mod dma;
mod maps;
mod transport;

pub use backend::backend_features;
pub use transport::{VdpaInfo, VdpaOptions, VdpaTransport};

/// The transport name in errors.
pub const NAME: &str = "vdpa";
