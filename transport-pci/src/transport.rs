//! [`PciTransport`]: the [`Transport`] of a modern virtio-pci function bound to `vfio-pci`.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vfio_bindings::bindings::vfio::{
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_REGION_INFO_FLAG_MMAP,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps, VfioRegionInfoCap};
use virtio_queue_core::RingFormat;
use virtio_transport_api::{
    Cause, CompletionEvent, DeviceStatus, DmaRegion, Error, EventFd, QueueSetup, Result, Step, Transport,
    VirtioFeatures,
};

use crate::addr::{self, PciAddress};
use crate::caps::{self, Identity, VirtioCaps, CONFIG_SPACE_LEN, NUM_BARS};
use crate::dma::Iommu;
use crate::msix::{Interrupts, QueueInterrupt, Ticker, VectorPlan};
use crate::regs::{BarMapping, Common, DeviceCfg, PciNotifier, VIRTIO_MSI_NO_VECTOR};
use crate::{vfio_error, NAME};

/// Feature bits the driver must accept with every device: VERSION_1 (modern interface)
/// and ACCESS_PLATFORM (DMA goes through the IOMMU, so IOVAs are what the device uses).
pub const REQUIRED_FEATURES: u64 = VirtioFeatures::VERSION_1.bits() | VirtioFeatures::ACCESS_PLATFORM.bits();

/// Feature bits this transport cannot honour, hidden from [`Transport::device_features`]:
/// its notifier writes the queue index only.
pub const UNSUPPORTED_FEATURES: u64 =
    VirtioFeatures::NOTIFICATION_DATA.bits() | VirtioFeatures::NOTIF_CONFIG_DATA.bits();

/// `PCI_COMMAND` and its memory-space and bus-master bits.
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 0x2;
const PCI_COMMAND_MASTER: u16 = 0x4;

/// How to drive the device.
#[derive(Clone, Debug)]
pub struct PciOptions {
    /// MSI-X where available (default), or polling only.
    pub interrupts: Interrupts,
    /// How often the completion events of polled queues are signalled.
    pub poll_interval: Duration,
    /// How long a reset may take (device_status reading 0 again) before it is an error.
    pub reset_timeout: Duration,
}

impl Default for PciOptions {
    fn default() -> Self {
        PciOptions {
            interrupts: Interrupts::Msix,
            poll_interval: Duration::from_millis(1),
            reset_timeout: Duration::from_secs(1),
        }
    }
}

/// Per-queue state since the last reset.
#[derive(Clone, Copy, Debug, Default)]
struct QueueState {
    /// The device's maximum queue size, read before the driver wrote its own.
    max_size: Option<u16>,
    enabled: bool,
    interrupt: Option<QueueInterrupt>,
}

/// A modern virtio-pci device bound to `vfio-pci`.
///
/// ```no_run
/// use transport_pci::{PciOptions, PciTransport};
/// use virtio_blk_dev::{BlkDevice, BlkOptions};
///
/// let transport = PciTransport::open("0000:00:03.0", PciOptions::default())?;
/// let mut dev = BlkDevice::open(transport, BlkOptions::default())?;
/// let mut q = dev.take_queue(0)?;
/// let mut sector = [0u8; 512];
/// q.read_at(0, &mut sector)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct PciTransport {
    address: PciAddress,
    identity: Identity,
    caps: VirtioCaps,
    options: PciOptions,
    offered: u64,
    driver_features: u64,
    num_queues: u16,
    queues: Vec<QueueState>,
    plan: VectorPlan,
    /// One eventfd per enabled MSI-X vector (index = vector).
    vectors: Vec<EventFd>,
    msix_error: Option<String>,
    config_vector: Option<u16>,
    config_vector_written: bool,
    ticker: Option<Ticker>,
    iommu: Arc<Iommu>,
    // The BAR mappings go before the device: a live mapping keeps the device file open.
    common: Common,
    device_cfg: Option<DeviceCfg>,
    notify_bar: Arc<BarMapping>,
    /// The VFIO device and its container; `None` only in host tests, whose "BAR" is memory.
    vfio: Option<Vfio>,
}

/// What VFIO gives: the device (config space, BAR regions, interrupts) and its container.
struct Vfio {
    device: VfioDevice,
    _container: Arc<VfioContainer>,
}

impl std::fmt::Debug for PciTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciTransport")
            .field("address", &self.address)
            .field("identity", &self.identity)
            .field("caps", &self.caps)
            .field("offered", &format_args!("{:#x}", self.offered))
            .field("num_queues", &self.num_queues)
            .field("plan", &self.plan)
            .finish_non_exhaustive()
    }
}

fn connect_err(cause: Cause) -> Error {
    Error::new(NAME, Step::Connect, cause)
}

fn read_config_space(device: &VfioDevice, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let off = libc::off_t::try_from(offset + done as u64)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "config offset"))?;
        let rest = &mut buf[done..];
        // SAFETY: reads at most `rest.len()` bytes into `rest`; the descriptor is the device's.
        let n = unsafe { libc::pread(device.as_raw_fd(), rest.as_mut_ptr().cast(), rest.len(), off) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        done += n as usize;
    }
    Ok(())
}

fn write_config_space(device: &VfioDevice, offset: u64, buf: &[u8]) -> std::io::Result<()> {
    let off = libc::off_t::try_from(offset)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "config offset"))?;
    // SAFETY: writes `buf.len()` bytes from `buf`; the descriptor is the device's.
    let n = unsafe { libc::pwrite(device.as_raw_fd(), buf.as_ptr().cast(), buf.len(), off) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if n as usize != buf.len() {
        return Err(std::io::ErrorKind::WriteZero.into());
    }
    Ok(())
}

/// Sets the bits `set` and clears the bits `clear` of `PCI_COMMAND`.
fn update_command(device: &VfioDevice, set: u16, clear: u16) -> std::io::Result<()> {
    let off = device.get_region_offset(VFIO_PCI_CONFIG_REGION_INDEX) + PCI_COMMAND;
    let mut cmd = [0u8; 2];
    read_config_space(device, off, &mut cmd)?;
    let command = (u16::from_le_bytes(cmd) | set) & !clear;
    write_config_space(device, off, &command.to_le_bytes())
}

/// A `vmm_sys_util` eventfd on a duplicate of `fd`, for the `vfio-ioctls` API.
fn sys_eventfd(fd: &EventFd) -> std::io::Result<vmm_sys_util::eventfd::EventFd> {
    let dup = std::os::fd::OwnedFd::from(fd.try_clone()?);
    // SAFETY: `dup` is an eventfd we own; ownership moves into the wrapper.
    Ok(unsafe {
        <vmm_sys_util::eventfd::EventFd as std::os::fd::FromRawFd>::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(
            dup,
        ))
    })
}

/// Checks what user space can check before VFIO is asked: the function exists, is bound to
/// `vfio-pci`, and has an IOMMU group. Returns the group number.
fn check_binding(address: &PciAddress, sysfs: &Path) -> Result<u32> {
    if !sysfs.exists() {
        return Err(Error::os(NAME, Step::Connect, std::io::Error::from_raw_os_error(libc::ENOENT))
            .with_context(format!("{address}: no such PCI function ({})", sysfs.display())));
    }
    match addr::link_name(sysfs, "driver") {
        Ok(d) if d == "vfio-pci" => {}
        Ok(d) => {
            return Err(connect_err(Cause::Unsupported(format!(
            "{address} is bound to {d}, not vfio-pci (unbind it and bind it to vfio-pci, e.g. through driver_override)"
        ))))
        }
        Err(_) => {
            return Err(connect_err(Cause::Unsupported(format!(
                "{address} is not bound to any driver; bind it to vfio-pci"
            ))))
        }
    }
    let group = addr::link_name(sysfs, "iommu_group").map_err(|_| {
        connect_err(Cause::Unsupported(format!(
            "{address} has no IOMMU group: the IOMMU is off (boot with intel_iommu=on / amd_iommu=on)"
        )))
    })?;
    addr::parse_group(&group).ok_or_else(|| {
        connect_err(Cause::Unsupported(format!("{address}: IOMMU group `{group}` is not a VFIO group number")))
    })
}

impl PciTransport {
    /// Opens the virtio-pci function `device`, a PCI address (`DDDD:BB:DD.F`) or its sysfs
    /// directory, which must be bound to `vfio-pci`.
    ///
    /// Opens its IOMMU group in a new type-1 v2 container, checks it is a modern virtio
    /// device, parses and maps its virtio structures, resets it, checks that it offers
    /// VERSION_1 and ACCESS_PLATFORM (a device without ACCESS_PLATFORM would DMA around the
    /// IOMMU and is refused with [`Cause::MissingFeatures`]), reads the IOVA windows, and
    /// routes MSI-X vectors to eventfds. Feature negotiation is left to the caller
    /// ([`virtio_transport_api::negotiate`], or `BlkDevice::open`).
    pub fn open(device: &str, options: PciOptions) -> Result<Self> {
        let (address, sysfs) = addr::resolve(device)
            .map_err(|e| Error::new(NAME, Step::Connect, Cause::InvalidArgument(e.to_string())))?;
        Self::open_sysfs(address, &sysfs, options).map_err(|e| match e.context() {
            Some(c) if c.starts_with(&address.to_string()) => e,
            Some(c) => {
                let c = format!("{address}: {c}");
                e.with_context(c)
            }
            None => e.with_context(address.to_string()),
        })
    }

    fn open_sysfs(address: PciAddress, sysfs: &Path, options: PciOptions) -> Result<Self> {
        let group = check_binding(&address, sysfs)?;
        let node = PathBuf::from(format!("/dev/vfio/{group}"));
        if !node.exists() {
            return Err(Error::os(NAME, Step::Connect, std::io::Error::from_raw_os_error(libc::ENOENT))
                .with_context(format!("{}: the VFIO group node is missing", node.display())));
        }
        let container = Arc::new(VfioContainer::new(None).map_err(|e| vfio_error(Step::Connect, "/dev/vfio/vfio", e))?);
        let ops: Arc<dyn VfioOps> = container.clone();
        let device = VfioDevice::new(sysfs, ops, false).map_err(|e| {
            let what = match e {
                vfio_ioctls::VfioError::GroupViable => format!(
                    "IOMMU group {group} is not viable: every device in it must be bound to vfio-pci (or to no driver)"
                ),
                _ => format!("VFIO group {group}"),
            };
            vfio_error(Step::Connect, &what, e)
        })?;

        // Configuration space, through VFIO's config region.
        let cfg_off = device.get_region_offset(VFIO_PCI_CONFIG_REGION_INDEX);
        if device.get_region_size(VFIO_PCI_CONFIG_REGION_INDEX) < CONFIG_SPACE_LEN as u64 {
            return Err(connect_err(Cause::Protocol("VFIO config region smaller than 256 bytes".into())));
        }
        let mut cfg = [0u8; CONFIG_SPACE_LEN];
        read_config_space(&device, cfg_off, &mut cfg)
            .map_err(|e| Error::os(NAME, Step::Connect, e).with_context("read of PCI configuration space"))?;
        let identity = caps::identify(&cfg).map_err(|e| connect_err(Cause::Unsupported(e.to_string())))?;
        let mut bar_sizes = [0u64; NUM_BARS];
        for (i, s) in bar_sizes.iter_mut().enumerate() {
            *s = device.get_region_size(i as u32);
        }
        let caps = caps::parse_virtio_caps(&cfg, &bar_sizes).map_err(|e| match e {
            caps::CapError::LegacyOnly { .. } => connect_err(Cause::Unsupported(e.to_string())),
            _ => connect_err(Cause::Protocol(e.to_string())),
        })?;

        // Memory space on, so the BARs answer; bus mastering only once the device is reset.
        update_command(&device, PCI_COMMAND_MEMORY, PCI_COMMAND_MASTER)
            .map_err(|e| Error::os(NAME, Step::Connect, e).with_context("PCI_COMMAND"))?;

        // Map the BARs the virtio structures are in.
        let fd = device.as_raw_fd();
        // SAFETY: the device descriptor is open while `device` lives, which outlives this use.
        let dev_fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let mut bars: [Option<Arc<BarMapping>>; NUM_BARS] = Default::default();
        for b in caps.bars() {
            let i = u32::from(b);
            if device.get_region_flags(i) & VFIO_REGION_INFO_FLAG_MMAP == 0 {
                return Err(connect_err(Cause::Unsupported(format!("VFIO does not allow mapping BAR {b}"))));
            }
            let (off, size) = (device.get_region_offset(i), device.get_region_size(i));
            // A sparse region (VFIO keeps the MSI-X table out of reach without interrupt
            // remapping) is mapped area by area; the virtio structures must lie in the areas.
            let sparse = device.get_region_caps(i).into_iter().find_map(|c| match c {
                VfioRegionInfoCap::SparseMmap(s) => {
                    Some(s.areas.iter().map(|a| (a.offset, a.size)).collect::<Vec<_>>())
                }
                _ => None,
            });
            let m = match &sparse {
                Some(areas) => BarMapping::map_sparse(dev_fd, b, off, size, areas),
                None => BarMapping::map(dev_fd, b, off, size),
            }
            .map_err(|e| Error::os(NAME, Step::Connect, e).with_context(format!("mmap of BAR {b}")))?;
            bars[usize::from(b)] = Some(Arc::new(m));
        }
        let bar = |b: u8| {
            bars[usize::from(b)].clone().ok_or_else(|| connect_err(Cause::Protocol(format!("BAR {b} not mapped"))))
        };
        let outside = |what: &str| {
            connect_err(Cause::Unsupported(format!(
                "the {what} structure is not in a part of its BAR that VFIO lets user space map (it shares pages with the MSI-X table?)"
            )))
        };
        let common = Common::new(bar(caps.common.bar)?, &caps.common).ok_or_else(|| outside("common configuration"))?;
        let device_cfg = match caps.device {
            Some(w) => Some(DeviceCfg::new(bar(w.bar)?, &w).ok_or_else(|| outside("device configuration"))?),
            None => None,
        };
        let notify_bar = bar(caps.notify.bar)?;

        let iommu = Arc::new(Iommu::new(Arc::clone(&container))?);

        let regs = (common, device_cfg, notify_bar);
        let t = PciTransport::unstarted(
            address,
            identity,
            caps,
            options,
            iommu,
            regs,
            Some(Vfio { device, _container: container }),
        );
        t.start()
    }

    /// A transport on mapped registers (`regs`: common configuration, device configuration,
    /// the notify registers' BAR) before [`PciTransport::start`]: nothing negotiated yet, no
    /// queues, no vectors.
    fn unstarted(
        address: PciAddress,
        identity: Identity,
        caps: VirtioCaps,
        options: PciOptions,
        iommu: Arc<Iommu>,
        (common, device_cfg, notify_bar): (Common, Option<DeviceCfg>, Arc<BarMapping>),
        vfio: Option<Vfio>,
    ) -> Self {
        PciTransport {
            address,
            identity,
            caps,
            options,
            offered: 0,
            driver_features: 0,
            num_queues: 0,
            queues: Vec::new(),
            plan: VectorPlan::none(),
            vectors: Vec::new(),
            msix_error: None,
            config_vector: None,
            config_vector_written: false,
            ticker: None,
            iommu,
            common,
            device_cfg,
            notify_bar,
            vfio,
        }
    }

    /// The part of opening that talks to the virtio registers: reset, bus mastering, the
    /// required features, the queue count, MSI-X.
    fn start(mut self) -> Result<Self> {
        let t = &mut self;
        t.reset()?;
        if let Some(v) = &t.vfio {
            update_command(&v.device, PCI_COMMAND_MASTER, 0)
                .map_err(|e| Error::os(NAME, Step::Connect, e).with_context("PCI_COMMAND bus master"))?;
        }
        t.offered = t.common.device_features();
        let missing = REQUIRED_FEATURES & !t.offered;
        if missing != 0 {
            let why = if missing & VirtioFeatures::ACCESS_PLATFORM.bits() != 0 {
                "the device does not offer VIRTIO_F_ACCESS_PLATFORM: its DMA would bypass the IOMMU, \
                 so IOVAs would not work and it could reach any memory; refused"
            } else {
                "the device does not offer VIRTIO_F_VERSION_1 (not a modern device)"
            };
            return Err(Error::new(NAME, Step::Features, Cause::MissingFeatures { missing, offered: t.offered })
                .with_context(why));
        }
        t.num_queues = t.common.num_queues();
        t.queues = vec![QueueState::default(); usize::from(t.num_queues)];
        t.setup_msix();
        Ok(self)
    }

    /// Plans and enables MSI-X vectors; on failure every queue polls (the reason is kept
    /// for [`PciTransport::msix_error`]).
    fn setup_msix(&mut self) {
        if self.options.interrupts == Interrupts::Polling {
            return;
        }
        let Some(vfio) = &self.vfio else {
            self.msix_error = Some("no VFIO device".into());
            return;
        };
        let table = vfio.device.get_irq_info(VFIO_PCI_MSIX_IRQ_INDEX).map_or(0, |i| i.count);
        let plan = VectorPlan::new(table, self.num_queues);
        if plan.vectors == 0 {
            self.msix_error = Some("the device has no MSI-X vectors".into());
            return;
        }
        let run = || -> std::result::Result<Vec<EventFd>, String> {
            let events: Vec<EventFd> = (0..plan.vectors)
                .map(|_| EventFd::new().map_err(|e| e.to_string()))
                .collect::<std::result::Result<_, _>>()?;
            let sys: Vec<vmm_sys_util::eventfd::EventFd> =
                events.iter().map(sys_eventfd).collect::<std::io::Result<_>>().map_err(|e| e.to_string())?;
            vfio.device
                .enable_msix(sys.iter().collect())
                .map_err(|e| format!("VFIO_DEVICE_SET_IRQS (MSI-X, {} vectors): {e}", plan.vectors))?;
            Ok(events)
        };
        match run() {
            Ok(events) => {
                self.vectors = events;
                self.config_vector = plan.config;
                self.plan = plan;
            }
            Err(e) => self.msix_error = Some(e),
        }
    }

    /// The PCI address.
    pub fn address(&self) -> PciAddress {
        self.address
    }

    /// The PCI and virtio identity of the function.
    pub fn identity(&self) -> Identity {
        self.identity
    }

    /// Where the virtio structures are.
    pub fn capabilities(&self) -> &VirtioCaps {
        &self.caps
    }

    /// The features the device offers, as read at open (before hiding what this transport
    /// cannot do).
    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    /// The driver features the device holds (read back from the common configuration):
    /// what the device crate accepted plus VIRTIO_F_ACCESS_PLATFORM, which this transport adds.
    pub fn driver_features(&mut self) -> u64 {
        self.common.driver_features()
    }

    /// The MSI-X vector plan in effect (no vectors: every queue polls).
    pub fn vector_plan(&self) -> &VectorPlan {
        &self.plan
    }

    /// Why MSI-X is not in use, if it is not (and was not turned off by the options).
    pub fn msix_error(&self) -> Option<&str> {
        self.msix_error.as_deref()
    }

    /// How queue `index` is notified of used buffers, once it is set up.
    pub fn queue_interrupt(&self, index: u16) -> Option<QueueInterrupt> {
        self.queues.get(usize::from(index)).and_then(|q| q.interrupt)
    }

    /// The eventfd of the configuration-change vector, if the device has one.
    pub fn config_event(&self) -> Option<&EventFd> {
        self.config_vector.and_then(|v| self.vectors.get(usize::from(v)))
    }

    /// The IOMMU's IOVA alignment and windows.
    pub fn iommu_info(&self) -> &crate::dma::IommuInfo {
        self.iommu.info()
    }

    fn invalid(step: Step, msg: String) -> Error {
        Error::new(NAME, step, Cause::InvalidArgument(msg))
    }

    fn queue_err(index: u16, msg: String) -> Error {
        Error::new(NAME, Step::Queue(index), Cause::Protocol(msg))
    }
}

impl Transport for PciTransport {
    type Notifier = PciNotifier;

    fn name(&self) -> &'static str {
        NAME
    }

    fn device_id(&self) -> u32 {
        self.identity.virtio_id
    }

    fn reset(&mut self) -> Result<()> {
        self.common.set_device_status(0);
        let deadline = Instant::now() + self.options.reset_timeout;
        let mut pause = Duration::from_micros(1);
        loop {
            let s = self.common.device_status();
            if s == 0 {
                break;
            }
            if Instant::now() >= deadline {
                return Err(Error::new(
                    NAME,
                    Step::Reset,
                    Cause::Protocol(format!(
                        "device_status still {s:#x} {:?} after writing 0",
                        self.options.reset_timeout
                    )),
                ));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(1));
        }
        self.driver_features = 0;
        self.config_vector_written = false;
        self.queues.iter_mut().for_each(|q| *q = QueueState::default());
        if let Some(t) = &self.ticker {
            t.clear();
        }
        Ok(())
    }

    fn status(&mut self) -> Result<DeviceStatus> {
        Ok(DeviceStatus::from_bits_retain(self.common.device_status()))
    }

    fn set_status(&mut self, status: DeviceStatus) -> Result<()> {
        if status.is_empty() {
            return self.reset();
        }
        self.common.set_device_status(status.bits());
        Ok(())
    }

    fn device_features(&mut self) -> Result<u64> {
        Ok(self.common.device_features() & !UNSUPPORTED_FEATURES)
    }

    fn set_driver_features(&mut self, features: u64) -> Result<()> {
        if DeviceStatus::from_bits_retain(self.common.device_status()).contains(DeviceStatus::FEATURES_OK) {
            return Err(Self::invalid(Step::Features, "features written after FEATURES_OK".into()));
        }
        if features & UNSUPPORTED_FEATURES != 0 {
            return Err(Error::new(
                NAME,
                Step::Features,
                Cause::Unsupported(format!(
                    "features {:#x} (NOTIFICATION_DATA / NOTIF_CONFIG_DATA): this transport's notifier writes the queue index only",
                    features & UNSUPPORTED_FEATURES
                )),
            ));
        }
        // ACCESS_PLATFORM is this transport's business, not the device crate's: without it
        // the device would take IOVAs for physical addresses. It was checked as offered at open.
        let features = features | VirtioFeatures::ACCESS_PLATFORM.bits();
        self.common.set_driver_features(features);
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
        Ok(u32::from(self.common.config_generation()))
    }

    fn read_config(&mut self, offset: u32, buf: &mut [u8]) -> Result<()> {
        let Some(cfg) = &self.device_cfg else {
            return Err(Error::new(
                NAME,
                Step::Config,
                Cause::Unsupported("the device has no device configuration".into()),
            ));
        };
        cfg.read(offset, buf).ok_or_else(|| {
            Self::invalid(
                Step::Config,
                format!("{} bytes at offset {offset} exceed the {}-byte device configuration", buf.len(), cfg.len()),
            )
        })
    }

    fn max_queues(&self) -> u16 {
        self.num_queues
    }

    fn max_queue_size(&mut self, index: u16) -> Result<u16> {
        let Some(q) = self.queues.get(usize::from(index)).copied() else {
            return Err(Self::invalid(Step::Queue(index), format!("the device has {} queues", self.num_queues)));
        };
        if let Some(max) = q.max_size {
            return Ok(max);
        }
        self.common.select_queue(index);
        let max = self.common.queue_size();
        if max == 0 {
            return Err(Self::queue_err(index, "queue_size reads 0: the queue is not available".into()));
        }
        self.queues[usize::from(index)].max_size = Some(max);
        Ok(max)
    }

    fn setup_queue(&mut self, index: u16, setup: &QueueSetup) -> Result<(PciNotifier, CompletionEvent)> {
        let step = Step::Queue(index);
        let max = self.max_queue_size(index)?;
        let status = DeviceStatus::from_bits_retain(self.common.device_status());
        if !status.contains(DeviceStatus::FEATURES_OK) || status.contains(DeviceStatus::DRIVER_OK) {
            return Err(Self::invalid(
                step,
                format!("queue set up in device status {status:?} (after FEATURES_OK, before DRIVER_OK)"),
            ));
        }
        if self.queues[usize::from(index)].enabled {
            return Err(Self::invalid(step, "queue already set up since the last reset".into()));
        }
        if setup.size == 0 || setup.size > max {
            return Err(Self::invalid(step, format!("size {} (the device allows 1..={max})", setup.size)));
        }
        let packed = setup.format == RingFormat::Packed;
        if packed && self.driver_features & VirtioFeatures::RING_PACKED.bits() == 0 {
            return Err(Self::invalid(step, "packed ring without VIRTIO_F_RING_PACKED negotiated".into()));
        }
        if !packed && !setup.size.is_power_of_two() {
            return Err(Self::invalid(step, format!("split ring size {} is not a power of two", setup.size)));
        }
        let a = setup.addresses;
        for (what, iova) in [("descriptor area", a.desc), ("driver area", a.driver), ("device area", a.device)] {
            if !self.iommu.iova_mapped(iova, 1) {
                return Err(Self::invalid(step, format!("{what} at IOVA {iova:#x} is not mapped for DMA")));
            }
        }

        if !self.config_vector_written {
            let want = self.config_vector.unwrap_or(VIRTIO_MSI_NO_VECTOR);
            let got = self.common.set_config_msix_vector(want);
            if got != want {
                // The device refused: configuration changes are simply not signalled.
                self.config_vector = None;
            }
            self.config_vector_written = true;
        }

        self.common.select_queue(index);
        if self.common.queue_enable() != 0 {
            return Err(Self::queue_err(index, "queue_enable reads 1 before the queue was set up".into()));
        }
        self.common.set_queue_size(setup.size);
        let mut interrupt = QueueInterrupt::Polling;
        match self.plan.queue(index) {
            Some(v) => {
                if self.common.set_queue_msix_vector(v) == v {
                    interrupt = QueueInterrupt::Msix(v);
                } else {
                    // NO_VECTOR (or anything else) read back: the device could not take it.
                    self.common.set_queue_msix_vector(VIRTIO_MSI_NO_VECTOR);
                }
            }
            None => {
                self.common.set_queue_msix_vector(VIRTIO_MSI_NO_VECTOR);
            }
        }
        self.common.set_queue_addresses(a.desc, a.driver, a.device);
        let notify_off = self.common.queue_notify_off();
        let offset = self.caps.notify_offset(notify_off).map_err(|e| Self::queue_err(index, e.to_string()))?;
        let notifier = PciNotifier::new(Arc::clone(&self.notify_bar), offset, index).ok_or_else(|| {
            Self::queue_err(
                index,
                format!("notify register at BAR offset {offset:#x} is outside the mapped part of its BAR"),
            )
        })?;

        let event = match interrupt {
            QueueInterrupt::Msix(v) => {
                let e = self
                    .vectors
                    .get(usize::from(v))
                    .ok_or_else(|| Self::queue_err(index, format!("no eventfd for vector {v}")))?;
                e.try_clone().map_err(|e| Error::os(NAME, step, e).with_context("eventfd"))?
            }
            QueueInterrupt::Polling => {
                let e = EventFd::new().map_err(|e| e.with_context("polling eventfd"))?;
                if self.ticker.is_none() {
                    let t = Ticker::spawn(self.options.poll_interval)
                        .map_err(|e| Error::os(NAME, step, e).with_context("polling thread"))?;
                    self.ticker = Some(t);
                }
                let tick = e.try_clone().map_err(|e| Error::os(NAME, step, e).with_context("eventfd"))?;
                if let Some(t) = &self.ticker {
                    t.add(tick);
                }
                e
            }
        };
        self.common.enable_queue();
        let q = &mut self.queues[usize::from(index)];
        q.enabled = true;
        q.interrupt = Some(interrupt);
        Ok((notifier, CompletionEvent::new(NAME, index, event)))
    }

    fn alloc_dma(&self, len: usize) -> Result<DmaRegion> {
        self.iommu.alloc(len)
    }

    unsafe fn map_memory(&self, addr: *mut u8, len: usize, _fd: BorrowedFd<'_>, _offset: u64) -> Result<u64> {
        // SAFETY: the caller keeps the memory mapped until `unmap_memory` or the transport's
        // drop, and the device may use it until then (the trait's contract); VFIO pins the
        // pages, so the descriptor is not needed.
        unsafe { self.iommu.map(addr, len) }
    }

    unsafe fn unmap_memory(&self, addr: *mut u8) -> Result<()> {
        self.iommu.unmap(addr)
    }

    fn translate(&self, addr: *const u8, len: usize) -> Option<u64> {
        self.iommu.translate(addr, len)
    }
}

impl Drop for PciTransport {
    fn drop(&mut self) {
        // Stop the device first: after the reset it no longer touches memory, so the IOMMU
        // mappings can go. DMA regions still alive elsewhere free their memory on their own.
        let _ = self.reset();
        // Bus mastering off: not even a misbehaving device can DMA any more.
        if let Some(v) = &self.vfio {
            let _ = update_command(&v.device, 0, PCI_COMMAND_MASTER);
            if !self.vectors.is_empty() {
                let _ = v.device.disable_msix();
            }
        }
        self.iommu.unmap_all();
        self.ticker = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caps::Window;
    use crate::dma::{DmaMapper, IommuInfo};
    use virtio_transport_api::{negotiate, MemFd, QueueAddresses};

    /// Maps nothing: the "device" is memory in this process.
    struct NoMapper;

    impl DmaMapper for NoMapper {
        unsafe fn map(&self, _iova: u64, _len: usize, _vaddr: *mut u8) -> Result<()> {
            Ok(())
        }
        fn unmap(&self, _iova: u64, _len: usize) -> Result<()> {
            Ok(())
        }
    }

    /// A register file in memory with QEMU's virtio-blk-pci layout (common at 0, device
    /// config at 0x2000, notify at 0x3000 with multiplier 4). Memory does not emulate the
    /// select registers, so a 32-bit feature value `f` reads as `f | f << 32`.
    struct FakeRegs {
        mem: MemFd,
    }

    const COMMON: usize = 0;
    const DEVICE: usize = 0x2000;

    impl FakeRegs {
        fn new(feature_word: u32, num_queues: u16, queue_size: u16) -> Self {
            let r = FakeRegs { mem: MemFd::new("fake-virtio-bar", 0x4000).unwrap() };
            r.poke(COMMON + 4, feature_word);
            r.poke(COMMON + 18, num_queues);
            r.poke(COMMON + 24, queue_size);
            r.poke(DEVICE, 131_072u64); // capacity in sectors
            r
        }

        fn poke<T: Copy>(&self, off: usize, v: T) {
            // SAFETY: inside the 16 KiB memfd mapping; a volatile store the test owns.
            unsafe { self.mem.as_ptr().add(off).cast::<T>().write_volatile(v) }
        }

        fn peek<T: Copy>(&self, off: usize) -> T {
            // SAFETY: as for `poke`.
            unsafe { self.mem.as_ptr().add(off).cast::<T>().read_volatile() }
        }

        fn transport(&self) -> Result<PciTransport> {
            let bar = Arc::new(BarMapping::map(self.mem.fd(), 4, 0, 0x4000).unwrap());
            let caps = VirtioCaps {
                common: Window { bar: 4, offset: 0, length: 0x1000 },
                isr: Window { bar: 4, offset: 0x1000, length: 0x1000 },
                device: Some(Window { bar: 4, offset: 0x2000, length: 0x1000 }),
                notify: Window { bar: 4, offset: 0x3000, length: 0x1000 },
                notify_off_multiplier: 4,
            };
            let info = IommuInfo { page_sizes: 4096, ranges: Some(vec![0x10_0000..=0xfff_ffff]) };
            let iommu = Arc::new(Iommu::with_mapper(Arc::new(NoMapper), info)?);
            let regs = (
                Common::new(Arc::clone(&bar), &caps.common).unwrap(),
                caps.device.and_then(|w| DeviceCfg::new(Arc::clone(&bar), &w)),
                bar,
            );
            PciTransport::unstarted(
                "0000:00:01.0".parse().unwrap(),
                Identity { pci_device_id: 0x1042, virtio_id: 2, transitional: false },
                caps,
                PciOptions { interrupts: Interrupts::Polling, ..Default::default() },
                iommu,
                regs,
                None,
            )
            .start()
        }
    }

    /// VERSION_1 | ACCESS_PLATFORM in the high half (and, through the missing select
    /// emulation, bits 0 and 1 in the low half).
    const MODERN: u32 = 0b11;

    fn ring(t: &PciTransport) -> (DmaRegion, QueueSetup) {
        let r = t.alloc_dma(3 * 4096).unwrap();
        let a = QueueAddresses { desc: r.iova(), driver: r.iova() + 4096, device: r.iova() + 8192 };
        (r, QueueSetup { size: 64, format: RingFormat::Split, addresses: a })
    }

    #[test]
    fn negotiation_adds_access_platform_and_hides_notification_data() {
        let regs = FakeRegs::new(MODERN | (1 << 6), 2, 256);
        let mut t = regs.transport().unwrap();
        assert_eq!(t.max_queues(), 2);
        assert_eq!(t.offered_features(), 0x43_0000_0043);
        assert_eq!(t.device_features().unwrap(), 0x3_0000_0043, "bit 38 (NOTIFICATION_DATA) hidden");
        let f = negotiate(&mut t, 1 << 6, 0).unwrap();
        assert_eq!(f, (1 << 33) | (1 << 32) | (1 << 6), "negotiate reports the transport's ACCESS_PLATFORM");
        // The last write of driver_feature is the high half: VERSION_1 | ACCESS_PLATFORM.
        assert_eq!(regs.peek::<u32>(COMMON + 12), 0b11);
        assert_eq!(regs.peek::<u8>(COMMON + 20), 0b1011, "ACKNOWLEDGE | DRIVER | FEATURES_OK");
        let e = t.set_driver_features(1 << 38).unwrap_err();
        assert!(e.to_string().contains("after FEATURES_OK"), "{e}");
        t.reset().unwrap();
        let e = t.set_driver_features(1 << 38).unwrap_err();
        assert!(matches!(e.cause(), Cause::Unsupported(m) if m.contains("NOTIFICATION_DATA")), "{e}");
        let mut cap = [0u8; 8];
        t.read_config(0, &mut cap).unwrap();
        assert_eq!(u64::from_le_bytes(cap), 131_072);
    }

    #[test]
    fn devices_without_access_platform_or_version_1_are_refused() {
        for (word, missing) in [(0b01, 1u64 << 33), (0b10, 1 << 32), (0, 3 << 32)] {
            let e = FakeRegs::new(word, 1, 256).transport().unwrap_err();
            assert_eq!(e.step(), Step::Features);
            assert!(matches!(e.cause(), Cause::MissingFeatures { missing: m, .. } if *m == missing), "{e}");
        }
        let e = FakeRegs::new(0b01, 1, 256).transport().unwrap_err();
        assert!(e.to_string().contains("would bypass the IOMMU"), "{e}");
    }

    #[test]
    fn queue_setup_programs_the_registers_and_notifies_at_the_right_place() {
        let regs = FakeRegs::new(MODERN, 2, 256);
        let mut t = regs.transport().unwrap();
        negotiate(&mut t, 0, 0).unwrap();
        let (r, setup) = ring(&t);
        regs.poke::<u16>(COMMON + 30, 1); // queue_notify_off
        let (n, _event) = t.setup_queue(1, &setup).unwrap();
        assert_eq!(regs.peek::<u16>(COMMON + 22), 1, "queue_select");
        assert_eq!(regs.peek::<u16>(COMMON + 24), 64, "queue_size");
        assert_eq!(regs.peek::<u16>(COMMON + 26), VIRTIO_MSI_NO_VECTOR, "no vector when polling");
        assert_eq!(regs.peek::<u32>(COMMON + 32), r.iova() as u32);
        assert_eq!(regs.peek::<u32>(COMMON + 40), (r.iova() + 4096) as u32);
        assert_eq!(regs.peek::<u16>(COMMON + 28), 1, "queue_enable");
        assert_eq!(t.queue_interrupt(1), Some(QueueInterrupt::Polling));
        virtio_transport_api::Notifier::notify(&n).unwrap();
        assert_eq!(regs.peek::<u16>(0x3000 + 4), 1, "queue 1 kicked at notify base + 1 * 4");
        // The maximum was read before the driver wrote 64 over it.
        assert_eq!(t.max_queue_size(1).unwrap(), 256);
    }

    #[test]
    fn hostile_queue_registers_are_protocol_errors() {
        // queue_notify_off pointing past the notification window.
        let regs = FakeRegs::new(MODERN, 1, 256);
        let mut t = regs.transport().unwrap();
        negotiate(&mut t, 0, 0).unwrap();
        let (_r, setup) = ring(&t);
        regs.poke::<u16>(COMMON + 30, 0x400);
        let e = t.setup_queue(0, &setup).unwrap_err();
        assert!(matches!(e.cause(), Cause::Protocol(m) if m.contains("notification window")), "{e}");
        assert_eq!(e.step(), Step::Queue(0));
        // queue_enable already set before set-up.
        t.reset().unwrap();
        negotiate(&mut t, 0, 0).unwrap();
        regs.poke::<u16>(COMMON + 30, 0);
        regs.poke::<u16>(COMMON + 28, 1);
        let e = t.setup_queue(0, &setup).unwrap_err();
        assert!(matches!(e.cause(), Cause::Protocol(m) if m.contains("queue_enable")), "{e}");
        // A queue the device sizes at 0.
        let regs = FakeRegs::new(MODERN, 1, 0);
        let mut t = regs.transport().unwrap();
        let e = t.max_queue_size(0).unwrap_err();
        assert!(matches!(e.cause(), Cause::Protocol(m) if m.contains("not available")), "{e}");
        // A device with no queues at all: every index is out of range.
        let mut t = FakeRegs::new(MODERN, 0, 256).transport().unwrap();
        assert_eq!(t.max_queues(), 0);
        assert!(matches!(t.max_queue_size(0).unwrap_err().cause(), Cause::InvalidArgument(_)));
    }

    #[test]
    fn queue_setup_after_driver_ok_is_refused() {
        let regs = FakeRegs::new(MODERN, 1, 256);
        let mut t = regs.transport().unwrap();
        negotiate(&mut t, 0, 0).unwrap();
        virtio_transport_api::driver_ok(&mut t).unwrap();
        let (_r, setup) = ring(&t);
        let e = t.setup_queue(0, &setup).unwrap_err();
        assert!(matches!(e.cause(), Cause::InvalidArgument(m) if m.contains("before DRIVER_OK")), "{e}");
    }

    #[test]
    fn drop_resets_the_device() {
        let regs = FakeRegs::new(MODERN, 1, 256);
        let mut t = regs.transport().unwrap();
        negotiate(&mut t, 0, 0).unwrap();
        assert_ne!(regs.peek::<u8>(COMMON + 20), 0);
        drop(t);
        assert_eq!(regs.peek::<u8>(COMMON + 20), 0, "device_status written 0");
    }

    /// A fake sysfs directory of a PCI function with the given links.
    struct FakeSysfs(PathBuf);

    impl FakeSysfs {
        fn new(name: &str, driver: Option<&str>, group: Option<&str>) -> Self {
            let root = std::env::temp_dir().join(format!("transport-pci-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            let dev = root.join("0000:00:01.0");
            std::fs::create_dir_all(&dev).unwrap();
            if let Some(d) = driver {
                std::os::unix::fs::symlink(format!("../../../bus/pci/drivers/{d}"), dev.join("driver")).unwrap();
            }
            if let Some(g) = group {
                std::os::unix::fs::symlink(format!("../../../kernel/iommu_groups/{g}"), dev.join("iommu_group"))
                    .unwrap();
            }
            FakeSysfs(root)
        }

        fn dev(&self) -> PathBuf {
            self.0.join("0000:00:01.0")
        }
    }

    impl Drop for FakeSysfs {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn addr() -> PciAddress {
        "0000:00:01.0".parse().unwrap()
    }

    fn unsupported(e: &Error) -> &str {
        match e.cause() {
            Cause::Unsupported(m) => m,
            other => panic!("expected Unsupported, got {other:?}"),
        }
    }

    #[test]
    fn binding_to_another_driver_is_named() {
        let s = FakeSysfs::new("virtio", Some("virtio-pci"), Some("3"));
        let e = check_binding(&addr(), &s.dev()).unwrap_err();
        assert_eq!(e.step(), Step::Connect);
        assert!(unsupported(&e).contains("bound to virtio-pci, not vfio-pci"), "{e}");
        let s = FakeSysfs::new("unbound", None, Some("3"));
        assert!(unsupported(&check_binding(&addr(), &s.dev()).unwrap_err()).contains("not bound to any driver"));
    }

    #[test]
    fn missing_or_odd_iommu_groups_are_named() {
        let s = FakeSysfs::new("nogroup", Some("vfio-pci"), None);
        assert!(unsupported(&check_binding(&addr(), &s.dev()).unwrap_err()).contains("IOMMU is off"));
        let s = FakeSysfs::new("noiommu", Some("vfio-pci"), Some("noiommu-0"));
        assert!(unsupported(&check_binding(&addr(), &s.dev()).unwrap_err()).contains("not a VFIO group number"));
        let s = FakeSysfs::new("ok", Some("vfio-pci"), Some("7"));
        assert_eq!(check_binding(&addr(), &s.dev()).unwrap(), 7);
    }

    #[test]
    fn open_of_a_sysfs_path_without_its_group_node_fails_cleanly() {
        // Group 4000000 has no /dev/vfio node on any machine.
        let s = FakeSysfs::new("nonode", Some("vfio-pci"), Some("4000000"));
        let path = s.dev();
        let e = PciTransport::open(path.to_str().unwrap(), PciOptions::default()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
        assert!(e.to_string().contains("/dev/vfio/4000000"), "{e}");
        assert!(e.to_string().contains("0000:00:01.0"), "the address is named: {e}");
    }

    #[test]
    fn required_and_hidden_features() {
        assert_eq!(REQUIRED_FEATURES, (1 << 32) | (1 << 33));
        assert_eq!(UNSUPPORTED_FEATURES, (1 << 38) | (1 << 39));
    }
}
