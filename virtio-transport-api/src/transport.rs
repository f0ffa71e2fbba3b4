//! The `Transport` trait and the generic steps every device crate runs on it.

use std::os::fd::BorrowedFd;

use virtio_queue_core::{DriverQueue, QueueAddresses, RingFormat};
use zerocopy::{FromBytes, IntoBytes};

use crate::dma::DmaRegion;
use crate::error::{Cause, Error, Result, Step};
use crate::event::{CompletionEvent, Notifier};
use crate::features::{DeviceStatus, VirtioFeatures};

/// What a transport needs to program one virtqueue into the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueSetup {
    /// Entries in the queue.
    pub size: u16,
    /// Split or packed.
    pub format: RingFormat,
    /// Device addresses of the descriptor, driver and device areas.
    pub addresses: QueueAddresses,
}

impl QueueSetup {
    /// The set-up of an existing driver queue (its size, format and addresses).
    pub fn of<T, Q: DriverQueue<T>>(queue: &Q) -> Self {
        QueueSetup { size: queue.queue_size(), format: queue.layout().format(), addresses: queue.addresses() }
    }
}

/// A way to reach a virtio device: vhost-user, vhost-vdpa, virtio-pci over VFIO.
///
/// Control operations take `&mut self`; memory operations take `&self` so a
/// device crate can allocate and translate while queues are in use. The hot
/// path (kicks, completion waits) goes through the per-queue
/// [`Transport::Notifier`] and [`CompletionEvent`], not through the transport.
pub trait Transport {
    /// The per-queue kick: cheap, `Send`, no allocation per notification.
    type Notifier: Notifier;

    /// Short transport name for messages (`"vhost-user"`, `"vdpa"`, `"pci"`).
    fn name(&self) -> &'static str;

    /// The virtio device ID (2 = block, 1 = network ...).
    fn device_id(&self) -> u32;

    /// Resets the device: status 0, queues forgotten, features cleared.
    /// Notifiers and completion events of earlier queues go stale.
    fn reset(&mut self) -> Result<()>;

    /// Reads the device status.
    fn status(&mut self) -> Result<DeviceStatus>;

    /// Writes the device status. Writing 0 resets the device.
    fn set_status(&mut self, status: DeviceStatus) -> Result<()>;

    /// The 64-bit feature word the device offers.
    fn device_features(&mut self) -> Result<u64>;

    /// Writes the features the driver accepts (before FEATURES_OK).
    fn set_driver_features(&mut self, features: u64) -> Result<()>;

    /// Feature bits that belong to the transport rather than to the device crate, accepted
    /// by [`negotiate`] whenever the device offers them: `VIRTIO_F_ACCESS_PLATFORM` for
    /// transports whose device reaches memory through an IOMMU (vhost-vdpa, VFIO PCI), so
    /// that the negotiated feature word a device crate reports is the one the device holds.
    /// A transport that cannot work without one of them refuses the device when it opens it.
    fn transport_features(&self) -> u64 {
        0
    }

    /// The configuration generation counter (constant for transports without one).
    fn config_generation(&mut self) -> Result<u32>;

    /// Reads `buf.len()` bytes of device configuration space at `offset`.
    fn read_config(&mut self, offset: u32, buf: &mut [u8]) -> Result<()>;

    /// Number of virtqueues the device has.
    fn max_queues(&self) -> u16;

    /// Largest queue size the device accepts for queue `index`.
    fn max_queue_size(&mut self, index: u16) -> Result<u16>;

    /// Programs queue `index` (after FEATURES_OK, before DRIVER_OK) and
    /// enables it. Returns the queue's notifier and its completion event.
    ///
    /// The ring memory must be device-visible (from [`Transport::alloc_dma`] or
    /// [`Transport::map_memory`]) and must stay so until the device is reset or
    /// the transport dropped.
    fn setup_queue(&mut self, index: u16, setup: &QueueSetup) -> Result<(Self::Notifier, CompletionEvent)>;

    /// Allocates at least `len` bytes of zeroed, device-visible memory.
    fn alloc_dma(&self, len: usize) -> Result<DmaRegion>;

    /// Makes `len` bytes of caller memory at `addr` visible to the device and
    /// returns the device address (IOVA) of `addr`.
    ///
    /// # Safety
    ///
    /// `addr .. addr + len` must be a shared mapping (`MAP_SHARED`) of `fd` at
    /// file offset `offset`, and must stay mapped, with nothing else placed
    /// there, until [`Transport::unmap_memory`] is called for it or the transport
    /// is dropped: the device may read and write it at any time until then.
    /// Transports that cannot use `fd` (an IOMMU maps process pages directly)
    /// ignore it.
    unsafe fn map_memory(&self, addr: *mut u8, len: usize, fd: BorrowedFd<'_>, offset: u64) -> Result<u64>;

    /// Undoes a [`Transport::map_memory`] of the mapping at `addr`.
    ///
    /// # Safety
    ///
    /// The device must no longer use the memory (no request in flight uses it).
    unsafe fn unmap_memory(&self, addr: *mut u8) -> Result<()>;

    /// The device address of `len` bytes at process address `addr`, if all of
    /// them lie in one mapped region.
    fn translate(&self, addr: *const u8, len: usize) -> Option<u64>;
}

/// Best-effort FAILED after an error; the original error is what matters.
fn fail<T: Transport + ?Sized>(t: &mut T, err: Error) -> Error {
    let status = t.status().unwrap_or(DeviceStatus::empty());
    let _ = t.set_status(status | DeviceStatus::FAILED);
    err
}

/// Initialises the device up to FEATURES_OK (virtio 1.2 §3.1.1) and returns
/// the negotiated features.
///
/// Resets, sets ACKNOWLEDGE and DRIVER, checks that every bit of `required`
/// (plus VERSION_1, always required) is offered, writes `offered & (supported |
/// required | transport features)` (see [`Transport::transport_features`]), sets
/// FEATURES_OK and reads it back. On any error the device is
/// left with FAILED set.
pub fn negotiate<T: Transport + ?Sized>(t: &mut T, supported: u64, required: u64) -> Result<u64> {
    t.reset()?;
    let mut run = || -> Result<u64> {
        t.set_status(DeviceStatus::ACKNOWLEDGE)?;
        t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER)?;
        let offered = t.device_features()?;
        let required = required | VirtioFeatures::VERSION_1.bits();
        let missing = required & !offered;
        if missing != 0 {
            return Err(Error::new(t.name(), Step::Features, Cause::MissingFeatures { missing, offered }));
        }
        let features = offered & (supported | required | t.transport_features());
        t.set_driver_features(features)?;
        t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK)?;
        let status = t.status()?;
        if status.contains(DeviceStatus::DEVICE_NEEDS_RESET) {
            return Err(Error::new(t.name(), Step::Features, Cause::NeedsReset));
        }
        if !status.contains(DeviceStatus::FEATURES_OK) {
            return Err(Error::new(t.name(), Step::Features, Cause::FeaturesNotAccepted { features }));
        }
        Ok(features)
    };
    run().map_err(|e| fail(t, e))
}

/// Sets DRIVER_OK (after the queues are set up): the device is live.
pub fn driver_ok<T: Transport + ?Sized>(t: &mut T) -> Result<()> {
    let run = |t: &mut T| -> Result<()> {
        let status = t.status()?;
        if status.contains(DeviceStatus::DEVICE_NEEDS_RESET) {
            return Err(Error::new(t.name(), Step::Status, Cause::NeedsReset));
        }
        t.set_status(status | DeviceStatus::DRIVER_OK)?;
        let status = t.status()?;
        if status.contains(DeviceStatus::DEVICE_NEEDS_RESET) {
            return Err(Error::new(t.name(), Step::Status, Cause::NeedsReset));
        }
        Ok(())
    };
    run(t).map_err(|e| fail(t, e))
}

/// Retries [`read_config`] makes before giving up on a changing generation.
pub const CONFIG_READ_ATTEMPTS: u32 = 16;

/// Reads a `C` at `offset` of the device configuration space, retrying while
/// the configuration generation changes during the read (at most
/// [`CONFIG_READ_ATTEMPTS`] times, then [`Cause::ConfigGenerationUnstable`]).
pub fn read_config<C: FromBytes + IntoBytes, T: Transport + ?Sized>(t: &mut T, offset: u32) -> Result<C> {
    let mut value = C::new_zeroed();
    read_config_bytes(t, offset, value.as_mut_bytes())?;
    Ok(value)
}

/// [`read_config`] into a byte buffer: for a structure of which the
/// negotiated features make only a prefix valid (a device may refuse reads
/// past the end of its own configuration space).
pub fn read_config_bytes<T: Transport + ?Sized>(t: &mut T, offset: u32, buf: &mut [u8]) -> Result<()> {
    for _ in 0..CONFIG_READ_ATTEMPTS {
        let before = t.config_generation()?;
        t.read_config(offset, buf)?;
        if t.config_generation()? == before {
            return Ok(());
        }
    }
    Err(Error::new(t.name(), Step::Config, Cause::ConfigGenerationUnstable { attempts: CONFIG_READ_ATTEMPTS }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventFd;
    use crate::memfd::MemFd;
    use std::ptr::NonNull;
    use zerocopy::byteorder::little_endian::{U32, U64};
    use zerocopy::{Immutable, KnownLayout};

    /// A device in memory: enough of the status machine to test the helpers.
    struct Fake {
        offered: u64,
        /// Features the device refuses at FEATURES_OK.
        refuse: u64,
        status: DeviceStatus,
        driver: u64,
        config: [u8; 16],
        /// The generation changes on each of the next this-many reads.
        unstable_reads: u32,
        generation: u32,
        resets: u32,
        log: Vec<DeviceStatus>,
    }

    impl Fake {
        fn new(offered: u64) -> Self {
            let mut config = [0u8; 16];
            config[..8].copy_from_slice(&4096u64.to_le_bytes());
            config[8..12].copy_from_slice(&512u32.to_le_bytes());
            Fake {
                offered,
                refuse: 0,
                status: DeviceStatus::empty(),
                driver: 0,
                config,
                unstable_reads: 0,
                generation: 0,
                resets: 0,
                log: Vec::new(),
            }
        }
    }

    impl Transport for Fake {
        type Notifier = EventFd;
        fn name(&self) -> &'static str {
            "fake"
        }
        fn device_id(&self) -> u32 {
            2
        }
        fn reset(&mut self) -> Result<()> {
            self.resets += 1;
            self.status = DeviceStatus::empty();
            self.driver = 0;
            Ok(())
        }
        fn status(&mut self) -> Result<DeviceStatus> {
            Ok(self.status)
        }
        fn set_status(&mut self, status: DeviceStatus) -> Result<()> {
            let mut status = status;
            if status.contains(DeviceStatus::FEATURES_OK)
                && !self.status.contains(DeviceStatus::FEATURES_OK)
                && self.driver & self.refuse != 0
            {
                status.remove(DeviceStatus::FEATURES_OK);
            }
            self.log.push(status);
            self.status = status;
            Ok(())
        }
        fn device_features(&mut self) -> Result<u64> {
            Ok(self.offered)
        }
        fn set_driver_features(&mut self, features: u64) -> Result<()> {
            self.driver = features;
            Ok(())
        }
        fn config_generation(&mut self) -> Result<u32> {
            if self.unstable_reads > 0 {
                self.unstable_reads -= 1;
                self.generation += 1;
            }
            Ok(self.generation)
        }
        fn read_config(&mut self, offset: u32, buf: &mut [u8]) -> Result<()> {
            let o = offset as usize;
            let src = self
                .config
                .get(o..o + buf.len())
                .ok_or_else(|| Error::new("fake", Step::Config, Cause::InvalidArgument("out of range".into())))?;
            buf.copy_from_slice(src);
            Ok(())
        }
        fn max_queues(&self) -> u16 {
            1
        }
        fn max_queue_size(&mut self, _index: u16) -> Result<u16> {
            Ok(256)
        }
        fn setup_queue(&mut self, index: u16, _setup: &QueueSetup) -> Result<(EventFd, CompletionEvent)> {
            let call = EventFd::new()?;
            Ok((EventFd::new()?, CompletionEvent::new("fake", index, call)))
        }
        fn alloc_dma(&self, len: usize) -> Result<DmaRegion> {
            let m = MemFd::new("fake", len).map_err(|e| Error::os("fake", Step::Memory, e))?;
            let (p, l) = (m.as_non_null(), m.len());
            // SAFETY: the memfd owns the mapping; identity IOVA.
            unsafe { DmaRegion::new(p, l, p.as_ptr() as u64, Box::new(m)) }
                .ok_or_else(|| Error::new("fake", Step::Memory, Cause::InvalidArgument("misaligned".into())))
        }
        unsafe fn map_memory(&self, addr: *mut u8, _len: usize, _fd: BorrowedFd<'_>, _offset: u64) -> Result<u64> {
            Ok(addr as u64)
        }
        unsafe fn unmap_memory(&self, _addr: *mut u8) -> Result<()> {
            Ok(())
        }
        fn translate(&self, addr: *const u8, _len: usize) -> Option<u64> {
            NonNull::new(addr as *mut u8).map(|p| p.as_ptr() as u64)
        }
    }

    const V1: u64 = VirtioFeatures::VERSION_1.bits();
    const EVENT_IDX: u64 = VirtioFeatures::EVENT_IDX.bits();
    const PACKED: u64 = VirtioFeatures::RING_PACKED.bits();

    #[test]
    fn negotiate_intersects_and_walks_the_status_sequence() {
        let mut t = Fake::new(V1 | EVENT_IDX | (1 << 9) | (1 << 6));
        let f = negotiate(&mut t, EVENT_IDX | PACKED | (1 << 9), 0).unwrap();
        assert_eq!(f, V1 | EVENT_IDX | (1 << 9));
        assert_eq!(t.driver, f);
        assert_eq!(t.resets, 1);
        use DeviceStatus as S;
        assert_eq!(t.log, [S::ACKNOWLEDGE, S::ACKNOWLEDGE | S::DRIVER, S::ACKNOWLEDGE | S::DRIVER | S::FEATURES_OK]);
        driver_ok(&mut t).unwrap();
        assert_eq!(t.status, S::ACKNOWLEDGE | S::DRIVER | S::FEATURES_OK | S::DRIVER_OK);
    }

    /// A transport with its own feature bit (as vhost-vdpa and VFIO PCI have ACCESS_PLATFORM).
    struct Iommu(Fake);

    impl Transport for Iommu {
        type Notifier = EventFd;
        fn name(&self) -> &'static str {
            "iommu"
        }
        fn device_id(&self) -> u32 {
            2
        }
        fn reset(&mut self) -> Result<()> {
            self.0.reset()
        }
        fn status(&mut self) -> Result<DeviceStatus> {
            self.0.status()
        }
        fn set_status(&mut self, status: DeviceStatus) -> Result<()> {
            self.0.set_status(status)
        }
        fn device_features(&mut self) -> Result<u64> {
            self.0.device_features()
        }
        fn set_driver_features(&mut self, features: u64) -> Result<()> {
            self.0.set_driver_features(features)
        }
        fn transport_features(&self) -> u64 {
            VirtioFeatures::ACCESS_PLATFORM.bits()
        }
        fn config_generation(&mut self) -> Result<u32> {
            self.0.config_generation()
        }
        fn read_config(&mut self, offset: u32, buf: &mut [u8]) -> Result<()> {
            self.0.read_config(offset, buf)
        }
        fn max_queues(&self) -> u16 {
            1
        }
        fn max_queue_size(&mut self, index: u16) -> Result<u16> {
            self.0.max_queue_size(index)
        }
        fn setup_queue(&mut self, index: u16, setup: &QueueSetup) -> Result<(EventFd, CompletionEvent)> {
            self.0.setup_queue(index, setup)
        }
        fn alloc_dma(&self, len: usize) -> Result<DmaRegion> {
            self.0.alloc_dma(len)
        }
        unsafe fn map_memory(&self, addr: *mut u8, len: usize, fd: BorrowedFd<'_>, offset: u64) -> Result<u64> {
            // SAFETY: the caller's contract, passed on.
            unsafe { self.0.map_memory(addr, len, fd, offset) }
        }
        unsafe fn unmap_memory(&self, addr: *mut u8) -> Result<()> {
            // SAFETY: the caller's contract, passed on.
            unsafe { self.0.unmap_memory(addr) }
        }
        fn translate(&self, addr: *const u8, len: usize) -> Option<u64> {
            self.0.translate(addr, len)
        }
    }

    #[test]
    fn negotiate_accepts_the_transport_s_own_bits_when_offered() {
        const AP: u64 = VirtioFeatures::ACCESS_PLATFORM.bits();
        let mut t = Iommu(Fake::new(V1 | EVENT_IDX | AP));
        let f = negotiate(&mut t, EVENT_IDX, 0).unwrap();
        assert_eq!(f, V1 | EVENT_IDX | AP, "the driver features report ACCESS_PLATFORM");
        assert_eq!(t.0.driver, f);
        // Not offered: not written, and not an error here (the transport refuses at open
        // if it cannot do without).
        let mut t = Iommu(Fake::new(V1 | EVENT_IDX));
        assert_eq!(negotiate(&mut t, EVENT_IDX, 0).unwrap(), V1 | EVENT_IDX);
        // A plain transport does not accept it.
        let mut t = Fake::new(V1 | AP);
        assert_eq!(negotiate(&mut t, 0, 0).unwrap(), V1);
    }

    #[test]
    fn negotiate_requires_version_1_and_sets_failed() {
        let mut t = Fake::new(EVENT_IDX);
        let e = negotiate(&mut t, EVENT_IDX, 0).unwrap_err();
        assert!(
            matches!(e.cause(), Cause::MissingFeatures { missing, offered } if *missing == V1 && *offered == EVENT_IDX)
        );
        assert!(t.status.contains(DeviceStatus::FAILED));
        assert!(e.to_string().starts_with("fake: feature negotiation: device lacks required features 0x100000000"));
    }

    #[test]
    fn negotiate_reports_missing_required_bits() {
        let mut t = Fake::new(V1);
        let e = negotiate(&mut t, 0, PACKED).unwrap_err();
        assert!(matches!(e.cause(), Cause::MissingFeatures { missing, .. } if *missing == PACKED));
        assert!(t.status.contains(DeviceStatus::FAILED));
    }

    #[test]
    fn negotiate_fails_when_features_ok_does_not_stick() {
        let mut t = Fake::new(V1 | EVENT_IDX);
        t.refuse = EVENT_IDX;
        let e = negotiate(&mut t, EVENT_IDX, 0).unwrap_err();
        assert!(matches!(e.cause(), Cause::FeaturesNotAccepted { features } if *features == V1 | EVENT_IDX));
        assert!(t.status.contains(DeviceStatus::FAILED));
        // Without the refused bit it works, after a reset.
        let f = negotiate(&mut t, 0, 0).unwrap();
        assert_eq!(f, V1);
        assert!(!t.status.contains(DeviceStatus::FAILED));
    }

    #[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Debug)]
    #[repr(C)]
    struct Cfg {
        capacity: U64,
        blk_size: U32,
    }

    #[test]
    fn read_config_retries_on_generation_change() {
        let mut t = Fake::new(V1);
        t.unstable_reads = 3;
        let c: Cfg = read_config(&mut t, 0).unwrap();
        assert_eq!(c.capacity.get(), 4096);
        assert_eq!(c.blk_size.get(), 512);
        let size: U32 = read_config(&mut t, 8).unwrap();
        assert_eq!(size.get(), 512);
    }

    #[test]
    fn read_config_gives_up_on_a_generation_that_never_settles() {
        let mut t = Fake::new(V1);
        t.unstable_reads = u32::MAX;
        let e = read_config::<Cfg, _>(&mut t, 0).unwrap_err();
        assert!(matches!(e.cause(), Cause::ConfigGenerationUnstable { attempts: CONFIG_READ_ATTEMPTS }));
        assert_eq!(e.step(), Step::Config);
    }

    #[test]
    fn queue_setup_from_a_core_queue() {
        use virtio_queue_core::{QueueConfig, RingFeatures, RingLayout, Slot, SplitQueue};
        let t = Fake::new(V1);
        let layout = RingLayout::split(64).unwrap();
        let mem = t.alloc_dma(layout.size()).unwrap();
        let mut slots: Vec<Slot<u32>> = (0..64).map(|_| Slot::new()).collect();
        let config = QueueConfig {
            queue_size: 64,
            ring: mem.shared_memory(),
            ring_iova: mem.iova(),
            features: RingFeatures::EVENT_IDX,
            indirect: None,
        };
        let q = SplitQueue::new(config, &mut slots[..]).unwrap();
        let s = QueueSetup::of(&q);
        assert_eq!(s.size, 64);
        assert_eq!(s.format, RingFormat::Split);
        assert_eq!(s.addresses.desc, mem.iova());
        assert_eq!(s.addresses.driver, mem.iova() + layout.driver_offset() as u64);
    }
}
