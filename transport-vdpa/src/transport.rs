//! [`VdpaTransport`]: opening `/dev/vhost-vdpa-N` and the [`Transport`] contract on it.

use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::Arc;

use vhost::vdpa::VhostVdpa;
use vhost::vhost_kern::vhost_binding::{vhost_vring_state, VHOST_SET_VRING_BASE};
use vhost::vhost_kern::VhostKernFeatures;
use vhost::{VhostBackend, VringConfigData};
use virtio_queue_core::RingFormat;
use virtio_transport_api::memfd::page_size;
use virtio_transport_api::{
    CompletionEvent, DeviceStatus, DmaRegion, Error, EventFd, IovaAllocator, QueueSetup, Result, Step, Transport,
    VirtioFeatures,
};

use crate::backend::{backend_features, invalid, no_guest_memory, vhost_error, Device};
use crate::config::{check_range, ConfigGeneration};
use crate::dma::{self, Shared};
use crate::NAME;

/// How to use the device.
#[derive(Clone, Debug)]
pub struct VdpaOptions {
    /// Group the IOTLB updates of device set-up into one batch when the
    /// kernel offers `VHOST_BACKEND_F_IOTLB_BATCH` (`false`: one update at a
    /// time, for testing both paths).
    pub iotlb_batch: bool,
}

impl Default for VdpaOptions {
    fn default() -> Self {
        VdpaOptions { iotlb_batch: true }
    }
}

/// What the device reported when it was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VdpaInfo {
    /// `VHOST_VDPA_GET_DEVICE_ID`.
    pub device_id: u32,
    /// `VHOST_VDPA_GET_CONFIG_SIZE`: bytes of configuration space.
    pub config_size: u32,
    /// `VHOST_VDPA_GET_VQS_COUNT`: virtqueues.
    pub vqs_count: u32,
    /// `VHOST_VDPA_GET_VRING_NUM`: largest queue size.
    pub vring_num: u16,
    /// `VHOST_VDPA_GET_IOVA_RANGE`: first and last usable IOVA (inclusive).
    pub iova_range: (u64, u64),
    /// `VHOST_GET_BACKEND_FEATURES`: what the kernel offers.
    pub backend_features_offered: u64,
    /// The backend features acked (`IOTLB_MSG_V2 | IOTLB_BATCH | IOTLB_PERSIST` as offered).
    pub backend_features: u64,
}

/// A virtio device behind `/dev/vhost-vdpa-N` (the kernel's vhost-vdpa bus
/// driver), driven through the `vhost` crate.
///
/// See the [crate docs](crate) for the memory rules and what is refused.
pub struct VdpaTransport {
    shared: Arc<Shared>,
    info: VdpaInfo,
    generation: ConfigGeneration,
    /// Features last written with `VHOST_SET_FEATURES`.
    driver_features: u64,
    path: String,
}

impl std::fmt::Debug for VdpaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VdpaTransport")
            .field("path", &self.path)
            .field("info", &self.info)
            .field("driver_features", &format_args!("{:#x}", self.driver_features))
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

/// A `vmm_sys_util` eventfd on a duplicate of `fd`, for the `vhost` crate's API.
fn sys_eventfd(fd: &EventFd, step: Step) -> Result<vmm_sys_util::eventfd::EventFd> {
    fd.to_vmm_sys_util().map_err(|e| Error::os(NAME, step, e))
}

/// Bytes of the descriptor, driver and device areas of a ring (virtio 1.2
/// §2.7 and §2.8, with the event-suppression fields).
fn ring_area_sizes(format: RingFormat, size: u16) -> [u64; 3] {
    let n = u64::from(size);
    match format {
        RingFormat::Split => [16 * n, 6 + 2 * n, 6 + 8 * n],
        RingFormat::Packed => [16 * n, 4, 4],
    }
}

impl VdpaTransport {
    /// Opens `path` (`/dev/vhost-vdpa-N`) with default options.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, VdpaOptions::default())
    }

    /// Opens `path`: SET_OWNER, backend features (`IOTLB_MSG_V2`,
    /// `IOTLB_BATCH`, `IOTLB_PERSIST` as offered), device id, config size,
    /// queue count and size, IOVA range, and the config-change eventfd. The
    /// device is not negotiated yet (see [`virtio_transport_api::negotiate`]).
    pub fn open_with(path: impl AsRef<Path>, options: VdpaOptions) -> Result<Self> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let ctx = |e: Error| {
            let what = match e.context() {
                Some(c) => format!("{shown}: {c}"),
                None => shown.clone(),
            };
            e.with_context(what)
        };
        let path_str = path.to_str().ok_or_else(|| invalid(Step::Connect, format!("{shown} is not UTF-8")))?;
        let mut device = Device::new(path_str, no_guest_memory()).map_err(|e| {
            let busy = matches!(&e, vhost::Error::VhostOpen(io) if io.raw_os_error() == Some(libc::EBUSY));
            let what = if busy { "open (vhost-vdpa allows one opener at a time)" } else { "open" };
            ctx(vhost_error(Step::Connect, what, e))
        })?;
        device.set_owner().map_err(|e| ctx(vhost_error(Step::Connect, "VHOST_SET_OWNER", e)))?;
        let offered = device
            .get_backend_features()
            .map_err(|e| ctx(vhost_error(Step::Connect, "VHOST_GET_BACKEND_FEATURES", e)))?;
        let mut wanted = backend_features::WANTED;
        if !options.iotlb_batch {
            wanted &= !backend_features::IOTLB_BATCH;
        }
        let acked = offered & wanted;
        device
            .set_backend_features(acked)
            .map_err(|e| ctx(vhost_error(Step::Connect, "VHOST_SET_BACKEND_FEATURES", e)))?;
        let device_id =
            device.get_device_id().map_err(|e| ctx(vhost_error(Step::Connect, "VHOST_VDPA_GET_DEVICE_ID", e)))?;
        let config_size =
            device.get_config_size().map_err(|e| ctx(vhost_error(Step::Config, "VHOST_VDPA_GET_CONFIG_SIZE", e)))?;
        let vqs_count =
            device.get_vqs_count().map_err(|e| ctx(vhost_error(Step::Connect, "VHOST_VDPA_GET_VQS_COUNT", e)))?;
        let vring_num =
            device.get_vring_num().map_err(|e| ctx(vhost_error(Step::Connect, "VHOST_VDPA_GET_VRING_NUM", e)))?;
        let range =
            device.get_iova_range().map_err(|e| ctx(vhost_error(Step::Memory, "VHOST_VDPA_GET_IOVA_RANGE", e)))?;
        let info = VdpaInfo {
            device_id,
            config_size,
            vqs_count,
            vring_num,
            iova_range: (range.first, range.last),
            backend_features_offered: offered,
            backend_features: acked,
        };
        check_info(&info).map_err(ctx)?;
        let iovas = iova_allocator(&info).map_err(ctx)?;

        let config_event = EventFd::new().map_err(|e| ctx(e.with_context("config eventfd")))?;
        let sys = sys_eventfd(&config_event, Step::Config)?;
        device.set_config_call(&sys).map_err(|e| ctx(vhost_error(Step::Config, "VHOST_VDPA_SET_CONFIG_CALL", e)))?;

        let batch = acked & backend_features::IOTLB_BATCH != 0;
        let persist = acked & backend_features::IOTLB_PERSIST != 0;
        Ok(VdpaTransport {
            shared: Arc::new(Shared::new(device, iovas, batch, persist)),
            info,
            generation: ConfigGeneration::new(config_event),
            driver_features: 0,
            path: shown,
        })
    }

    /// What the device reported at open.
    pub fn info(&self) -> &VdpaInfo {
        &self.info
    }

    /// The device node this transport opened.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Whether IOTLB updates are being collected in a set-up batch now
    /// (between a reset and DRIVER_OK, when the kernel offers IOTLB_BATCH).
    pub fn in_iotlb_batch(&self) -> bool {
        self.shared.in_batch()
    }

    /// Bytes of the IOVA window not handed out (for leak checks).
    pub fn free_iova_bytes(&self) -> u64 {
        self.shared.free_iova_bytes()
    }

    /// Number of ranges mapped for the device (for leak checks).
    pub fn mappings(&self) -> usize {
        self.shared.mappings()
    }

    fn device(&self) -> &Device {
        &self.shared.device
    }

    fn write_status(&self, status: DeviceStatus) -> Result<()> {
        let step = if status.is_empty() { Step::Reset } else { Step::Status };
        self.device().set_status(status.bits()).map_err(|e| {
            vhost_error(step, "VHOST_VDPA_SET_STATUS", e)
                .with_context(format!("VHOST_VDPA_SET_STATUS {:#x}", status.bits()))
        })
    }

    /// VHOST_SET_VRING_BASE for a packed ring: avail and used positions at 0
    /// with both wrap counters set (0x8000_8000), which the `vhost` crate's
    /// 16-bit `set_vring_base` cannot express.
    fn set_packed_vring_base(&self, index: u16) -> Result<()> {
        let state = vhost_vring_state { index: u32::from(index), num: 0x8000_8000 };
        // SAFETY: VHOST_SET_VRING_BASE reads one `vhost_vring_state`, which
        // lives across the call; the fd is the open vhost-vdpa device.
        let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(self.device(), VHOST_SET_VRING_BASE(), &state) };
        if rc < 0 {
            return Err(Error::last_os(NAME, Step::Queue(index)).with_context("VHOST_SET_VRING_BASE"));
        }
        Ok(())
    }
}

/// Refuses what no driver can work with.
fn check_info(info: &VdpaInfo) -> Result<()> {
    let bad = |what: String| Err(Error::new(NAME, Step::Connect, virtio_transport_api::Cause::Protocol(what)));
    if info.vqs_count == 0 {
        return bad("the device reports 0 virtqueues (VHOST_VDPA_GET_VQS_COUNT)".into());
    }
    if info.vring_num == 0 {
        return bad("the device reports a maximum queue size of 0 (VHOST_VDPA_GET_VRING_NUM)".into());
    }
    if info.iova_range.0 > info.iova_range.1 {
        let (first, last) = info.iova_range;
        return bad(format!("empty IOVA range {first:#x}..={last:#x} (VHOST_VDPA_GET_IOVA_RANGE)"));
    }
    Ok(())
}

/// The allocator over the device's IOVA window, page aligned.
fn iova_allocator(info: &VdpaInfo) -> Result<IovaAllocator> {
    let (first, last) = info.iova_range;
    IovaAllocator::new([first..=last], page_size() as u64).map_err(|e| {
        Error::new(NAME, Step::Memory, virtio_transport_api::Cause::Protocol(e.to_string()))
            .with_context(format!("VHOST_VDPA_GET_IOVA_RANGE {first:#x}..={last:#x}"))
    })
}

impl Transport for VdpaTransport {
    type Notifier = EventFd;

    fn name(&self) -> &'static str {
        NAME
    }

    fn device_id(&self) -> u32 {
        self.info.device_id
    }

    fn reset(&mut self) -> Result<()> {
        // A set-up batch still open ends first: its updates must reach the
        // parent before the reset decides what to keep. The reset is made
        // even if that fails; the first error is returned.
        let batch = self.shared.end_batch();
        self.write_status(DeviceStatus::empty())?;
        self.driver_features = 0;
        batch?;
        self.shared.after_reset()
    }

    fn status(&mut self) -> Result<DeviceStatus> {
        let s = self.device().get_status().map_err(|e| vhost_error(Step::Status, "VHOST_VDPA_GET_STATUS", e))?;
        Ok(DeviceStatus::from_bits_retain(s))
    }

    fn set_status(&mut self, status: DeviceStatus) -> Result<()> {
        if status.is_empty() {
            return self.reset();
        }
        if status.contains(DeviceStatus::DRIVER_OK) {
            // The device may use every mapping from now on.
            self.shared.end_batch()?;
        }
        self.write_status(status)
    }

    fn device_features(&mut self) -> Result<u64> {
        self.device().get_features().map_err(|e| vhost_error(Step::Features, "VHOST_GET_FEATURES", e))
    }

    fn set_driver_features(&mut self, features: u64) -> Result<()> {
        // Device addresses on this transport are IOVAs translated by the vhost
        // IOTLB: that is VIRTIO_F_ACCESS_PLATFORM, and parents refuse a
        // feature set without it when they offer it (vdpa_sim does).
        let offered = self.device_features()?;
        let features = features | (offered & VirtioFeatures::ACCESS_PLATFORM.bits());
        self.device().set_features(features).map_err(|e| {
            vhost_error(Step::Features, "VHOST_SET_FEATURES", e)
                .with_context(format!("VHOST_SET_FEATURES {features:#x}"))
        })?;
        self.driver_features = features;
        Ok(())
    }

    /// ACCESS_PLATFORM: the device's addresses are IOVAs behind an IOMMU. `negotiate`
    /// accepts it, so the device crate's negotiated features show it; `set_driver_features`
    /// adds it as well, for callers that write features themselves.
    fn transport_features(&self) -> u64 {
        VirtioFeatures::ACCESS_PLATFORM.bits()
    }

    fn config_generation(&mut self) -> Result<u32> {
        self.generation.current()
    }

    fn read_config(&mut self, offset: u32, buf: &mut [u8]) -> Result<()> {
        check_range(offset, buf.len(), self.info.config_size)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.device().get_config(offset, buf).map_err(|e| vhost_error(Step::Config, "VHOST_VDPA_GET_CONFIG", e))
    }

    fn max_queues(&self) -> u16 {
        u16::try_from(self.info.vqs_count).unwrap_or(u16::MAX)
    }

    fn max_queue_size(&mut self, index: u16) -> Result<u16> {
        if index >= self.max_queues() {
            return Err(invalid(Step::Queue(index), format!("the device has {} queues", self.max_queues())));
        }
        Ok(self.info.vring_num)
    }

    fn setup_queue(&mut self, index: u16, setup: &QueueSetup) -> Result<(EventFd, CompletionEvent)> {
        let step = Step::Queue(index);
        let max = self.max_queue_size(index)?;
        if !self.status()?.contains(DeviceStatus::FEATURES_OK) {
            return Err(invalid(step, "queue set up before FEATURES_OK"));
        }
        if setup.size == 0 || setup.size > max || !setup.size.is_power_of_two() {
            return Err(invalid(step, format!("size {} (a power of two, at most {max})", setup.size)));
        }
        let packed = setup.format == RingFormat::Packed;
        if packed && self.driver_features & VirtioFeatures::RING_PACKED.bits() == 0 {
            return Err(invalid(step, "packed ring without VIRTIO_F_RING_PACKED negotiated"));
        }
        let a = setup.addresses;
        let sizes = ring_area_sizes(setup.format, setup.size);
        for ((what, iova), len) in
            [("descriptor area", a.desc), ("driver area", a.driver), ("device area", a.device)].into_iter().zip(sizes)
        {
            if !self.shared.iova_mapped(iova, len) {
                return Err(invalid(
                    step,
                    format!("{what} at IOVA {iova:#x} (+{len:#x}) is not mapped for the device"),
                ));
            }
        }
        let i = usize::from(index);
        let dev = self.device();
        dev.set_vring_num(i, setup.size).map_err(|e| vhost_error(step, "VHOST_SET_VRING_NUM", e))?;
        let config = VringConfigData {
            queue_max_size: max,
            queue_size: setup.size,
            flags: 0,
            desc_table_addr: a.desc,
            used_ring_addr: a.device,
            avail_ring_addr: a.driver,
            log_addr: None,
        };
        // The inherent method: it passes the IOVAs through, where the
        // `VhostBackend` trait method would translate them as guest-physical
        // addresses through the (empty) address space.
        Device::set_vring_addr(dev, i, &config).map_err(|e| vhost_error(step, "VHOST_SET_VRING_ADDR", e))?;
        if packed {
            self.set_packed_vring_base(index)?;
        } else {
            dev.set_vring_base(i, 0).map_err(|e| vhost_error(step, "VHOST_SET_VRING_BASE", e))?;
        }
        let kick = EventFd::new().map_err(|e| e.with_context("kick eventfd"))?;
        let call = EventFd::new().map_err(|e| e.with_context("call eventfd"))?;
        dev.set_vring_call(i, &sys_eventfd(&call, step)?).map_err(|e| vhost_error(step, "VHOST_SET_VRING_CALL", e))?;
        dev.set_vring_kick(i, &sys_eventfd(&kick, step)?).map_err(|e| vhost_error(step, "VHOST_SET_VRING_KICK", e))?;
        dev.set_vring_enable(i, true).map_err(|e| vhost_error(step, "VHOST_VDPA_SET_VRING_ENABLE", e))?;
        Ok((kick, CompletionEvent::new(NAME, index, call)))
    }

    fn alloc_dma(&self, len: usize) -> Result<DmaRegion> {
        dma::alloc_dma(&self.shared, len)
    }

    unsafe fn map_memory(&self, addr: *mut u8, len: usize, fd: BorrowedFd<'_>, offset: u64) -> Result<u64> {
        dma::map_memory(&self.shared, addr as usize, len, fd, offset)
    }

    unsafe fn unmap_memory(&self, addr: *mut u8) -> Result<()> {
        self.shared.unmap(addr as usize)
    }

    fn translate(&self, addr: *const u8, len: usize) -> Option<u64> {
        self.shared.translate(addr as usize, len)
    }
}

impl Drop for VdpaTransport {
    fn drop(&mut self) {
        // Stop the device first, then take every mapping away; regions that
        // outlive the transport only free their memory. Closing the
        // descriptor (when `shared` goes) ends the session.
        let _ = self.shared.end_batch();
        let _ = self.write_status(DeviceStatus::empty());
        self.shared.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> VdpaInfo {
        VdpaInfo {
            device_id: 2,
            config_size: 60,
            vqs_count: 1,
            vring_num: 256,
            iova_range: (0, u64::MAX),
            backend_features_offered: 0,
            backend_features: 0,
        }
    }

    #[test]
    fn device_reports_that_leave_nothing_usable_are_refused() {
        check_info(&info()).unwrap();
        let e = check_info(&VdpaInfo { vqs_count: 0, ..info() }).unwrap_err();
        assert_eq!(e.step(), Step::Connect);
        assert!(e.to_string().contains("0 virtqueues"), "{e}");
        assert!(check_info(&VdpaInfo { vring_num: 0, ..info() }).is_err());
        let e = check_info(&VdpaInfo { iova_range: (0x2000, 0x1000), ..info() }).unwrap_err();
        assert!(e.to_string().contains("empty IOVA range"), "{e}");
    }

    #[test]
    fn the_iova_window_is_page_aligned_and_never_zero() {
        let page = page_size() as u64;
        let mut a = iova_allocator(&info()).unwrap();
        assert_eq!(a.alloc(1).unwrap(), page);
        let mut a = iova_allocator(&VdpaInfo { iova_range: (0x1234, 0x10_0000 - 1), ..info() }).unwrap();
        assert_eq!(a.alloc(page).unwrap() % page, 0);
        // Less than one whole page inside the window.
        let e = iova_allocator(&VdpaInfo { iova_range: (page + 1, 2 * page), ..info() }).unwrap_err();
        assert_eq!(e.step(), Step::Memory);
        assert!(e.to_string().contains("VHOST_VDPA_GET_IOVA_RANGE"), "{e}");
    }

    #[test]
    fn ring_areas_follow_the_spec_sizes() {
        assert_eq!(ring_area_sizes(RingFormat::Split, 256), [4096, 518, 2054]);
        assert_eq!(ring_area_sizes(RingFormat::Packed, 256), [4096, 4, 4]);
    }

    #[test]
    fn opening_a_missing_node_names_the_path_and_step() {
        let e = VdpaTransport::open("/dev/vhost-vdpa-does-not-exist").unwrap_err();
        assert_eq!(e.step(), Step::Connect);
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        assert!(e.to_string().contains("/dev/vhost-vdpa-does-not-exist"), "{e}");
    }
}
