//! A virtio-blk driver (virtio 1.2 §5.2), generic over the transport.
//!
//! [`BlkDevice::open`] negotiates features, reads the configuration and sets
//! up the request queues; each [`BlkQueue`] is `Send` and is used from one
//! thread. Requests move their [`DmaBuf`]s into the queue and get them back
//! in the [`Completion`], so the device can never write memory the caller
//! has freed or reused. Every request is checked against the configuration
//! (alignment, capacity, segment limits, read-only, negotiated features)
//! before it touches the ring. Request headers and status bytes live in a
//! per-queue device-visible area allocated at open: no allocation per request.
//!
//! # Example
//!
//! ```no_run
//! use transport_vhost_user::{VhostUserOptions, VhostUserTransport};
//! use virtio_blk_dev::{BlkDevice, BlkOptions};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let transport = VhostUserTransport::connect("/tmp/vhost.sock", VhostUserOptions::default())?;
//! let mut dev = BlkDevice::open(transport, BlkOptions::default())?;
//! println!("{} bytes in {}-byte blocks", dev.capacity(), dev.block_size());
//! let buf = dev.alloc_buf(4096)?;
//! let mut q = dev.take_queue(0)?;
//!
//! // Asynchronous: the buffer moves in, and comes back with the completion.
//! q.submit_read(0, buf, 1).map_err(|r| r.error)?;
//! let done = q.wait(None).expect("one request in flight");
//! done.result?;
//!
//! // Blocking, through the queue's bounce buffer.
//! let mut data = vec![0u8; 8192];
//! q.read_at(4096, &mut data)?;
//! # Ok(())
//! # }
//! ```

mod buf;
mod config;
mod device;
mod error;
#[cfg(feature = "loopback")]
pub mod loopback;
mod pace;
mod queue;
pub mod spec;
#[cfg(feature = "suite")]
pub mod suite;

pub use buf::DmaBuf;
pub use config::{BlkConfig, BlkFeatures, Topology};
pub use device::{BlkDevice, BlkOptions, VIRTIO_ID_BLOCK};
pub use error::{BlkError, DeviceStatus, Result};
pub use pace::PollPacer;
pub use queue::{BlkQueue, Bufs, Completion, Rejected, RequestKind};
pub use spec::ID_LEN;

#[cfg(test)]
mod tests {
    use super::*;

    fn is_send<S: Send>() {}

    #[test]
    fn queues_are_send() {
        is_send::<BlkQueue<transport_vhost_user::VhostUserTransport>>();
        is_send::<DmaBuf>();
        is_send::<Completion>();
    }
}
