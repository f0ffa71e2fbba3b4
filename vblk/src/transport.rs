//! One transport type for every target `vblk` can open: the commands drive a
//! `BlkDevice<AnyTransport>` whatever the device is reached through.
//!
//! Each method forwards to the transport inside; the per-request cost is one `match` in the
//! kick ([`AnyNotifier::notify`]), next to a system call or an MMIO write.

use std::os::fd::BorrowedFd;

use transport_pci::PciTransport;
use transport_vdpa::VdpaTransport;
use transport_vhost_user::VhostUserTransport;
use virtio_transport_api::{CompletionEvent, DeviceStatus, DmaRegion, Notifier, QueueSetup, Result, Transport};

/// Calls `$method` on whichever transport `$self` holds.
macro_rules! each {
    ($self:expr, $t:ident => $body:expr) => {
        match $self {
            AnyTransport::VhostUser($t) => $body,
            AnyTransport::Vdpa($t) => $body,
            AnyTransport::Pci($t) => $body,
        }
    };
}

/// A vhost-user, vhost-vdpa or VFIO PCI transport.
pub enum AnyTransport {
    /// `--vhost-user PATH`, and the embedded server.
    VhostUser(VhostUserTransport),
    /// `--vdpa /dev/vhost-vdpa-N`.
    Vdpa(VdpaTransport),
    /// `--pci DDDD:BB:DD.F` (bound to vfio-pci); boxed, it holds the BAR maps and MSI-X state.
    Pci(Box<PciTransport>),
}

/// The kick of an [`AnyTransport`] queue.
pub enum AnyNotifier {
    /// A vhost-user kick eventfd.
    VhostUser(<VhostUserTransport as Transport>::Notifier),
    /// A vhost-vdpa kick eventfd.
    Vdpa(<VdpaTransport as Transport>::Notifier),
    /// A write to the queue's virtio-pci notify register.
    Pci(<PciTransport as Transport>::Notifier),
}

impl Notifier for AnyNotifier {
    fn notify(&self) -> Result<()> {
        match self {
            AnyNotifier::VhostUser(n) => n.notify(),
            AnyNotifier::Vdpa(n) => n.notify(),
            AnyNotifier::Pci(n) => n.notify(),
        }
    }
}

impl Transport for AnyTransport {
    type Notifier = AnyNotifier;

    fn name(&self) -> &'static str {
        each!(self, t => t.name())
    }
    fn device_id(&self) -> u32 {
        each!(self, t => t.device_id())
    }
    fn reset(&mut self) -> Result<()> {
        each!(self, t => t.reset())
    }
    fn status(&mut self) -> Result<DeviceStatus> {
        each!(self, t => t.status())
    }
    fn set_status(&mut self, status: DeviceStatus) -> Result<()> {
        each!(self, t => t.set_status(status))
    }
    fn device_features(&mut self) -> Result<u64> {
        each!(self, t => t.device_features())
    }
    fn set_driver_features(&mut self, features: u64) -> Result<()> {
        each!(self, t => t.set_driver_features(features))
    }
    fn transport_features(&self) -> u64 {
        each!(self, t => t.transport_features())
    }
    fn config_generation(&mut self) -> Result<u32> {
        each!(self, t => t.config_generation())
    }
    fn read_config(&mut self, offset: u32, buf: &mut [u8]) -> Result<()> {
        each!(self, t => t.read_config(offset, buf))
    }
    fn max_queues(&self) -> u16 {
        each!(self, t => t.max_queues())
    }
    fn max_queue_size(&mut self, index: u16) -> Result<u16> {
        each!(self, t => t.max_queue_size(index))
    }
    fn setup_queue(&mut self, index: u16, setup: &QueueSetup) -> Result<(AnyNotifier, CompletionEvent)> {
        match self {
            AnyTransport::VhostUser(t) => t.setup_queue(index, setup).map(|(n, c)| (AnyNotifier::VhostUser(n), c)),
            AnyTransport::Vdpa(t) => t.setup_queue(index, setup).map(|(n, c)| (AnyNotifier::Vdpa(n), c)),
            AnyTransport::Pci(t) => t.setup_queue(index, setup).map(|(n, c)| (AnyNotifier::Pci(n), c)),
        }
    }
    fn alloc_dma(&self, len: usize) -> Result<DmaRegion> {
        each!(self, t => t.alloc_dma(len))
    }
    unsafe fn map_memory(&self, addr: *mut u8, len: usize, fd: BorrowedFd<'_>, offset: u64) -> Result<u64> {
        // SAFETY: the caller keeps `map_memory`'s contract; it is passed on unchanged.
        each!(self, t => unsafe { t.map_memory(addr, len, fd, offset) })
    }
    unsafe fn unmap_memory(&self, addr: *mut u8) -> Result<()> {
        // SAFETY: the caller keeps `unmap_memory`'s contract; it is passed on unchanged.
        each!(self, t => unsafe { t.unmap_memory(addr) })
    }
    fn translate(&self, addr: *const u8, len: usize) -> Option<u64> {
        each!(self, t => t.translate(addr, len))
    }
}
