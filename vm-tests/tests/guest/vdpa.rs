//! vhost-vdpa devices: `vdpa_sim_blk` (VA and PA mode) and VDUSE, through `transport-vdpa`.
//! `main.rs` invokes [`vhost_vdpa_tests!`] once per device kind, so each gets a top-level
//! module named after its phase prefix.

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;

use transport_vdpa::{backend_features, VdpaOptions, VdpaTransport};
use virtio_blk_dev::{BlkDevice, BlkFeatures, BlkOptions};
use virtio_transport_api::{
    negotiate, Cause, DeviceStatus, MemFd, QueueAddresses, QueueSetup, RingFormat, Step, Transport, VirtioFeatures,
};
use vm_tests::{has_feature, link_name, DeviceKind, VhostVdpa, F_ACCESS_PLATFORM, F_VERSION_1, VIRTIO_ID_BLOCK};

/// The backing file of the VDUSE export (`setup_vduse` in xtask/src/vm/guest.rs:
/// qemu-storage-daemon's `driver=file` blockdev, page cache shared with this process).
pub const VDUSE_IMAGE: &str = "/tmp/vduse.img";

/// The backing file a test can read directly, if the device has one.
pub fn image_of(kind: DeviceKind) -> Option<std::path::PathBuf> {
    (kind == DeviceKind::Vduse).then(|| VDUSE_IMAGE.into())
}

/// PA-mode parents pin the pages of every mapping, counted against RLIMIT_MEMLOCK (8 MiB by
/// default); the guest tests run as root and lift it, as a VMM would.
pub fn lift_memlock_limit() {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit reads one live rlimit.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    assert_eq!(rc, 0, "setrlimit(RLIMIT_MEMLOCK): {}", std::io::Error::last_os_error());
}

/// The transport on `node`, or a failed test saying why.
pub fn open_transport(node: &Path) -> VdpaTransport {
    open_transport_with(node, VdpaOptions::default())
}

/// The transport on `node` with `options`.
pub fn open_transport_with(node: &Path, options: VdpaOptions) -> VdpaTransport {
    lift_memlock_limit();
    VdpaTransport::open_with(node, options).unwrap_or_else(|e| panic!("open {}: {e}", node.display()))
}

/// A `BlkDevice` on `node` with `options`.
pub fn open_blk(node: &Path, options: BlkOptions) -> BlkDevice<VdpaTransport> {
    open_blk_with(node, VdpaOptions::default(), options)
}

/// A `BlkDevice` on `node` with transport options `vdpa` and `options`.
pub fn open_blk_with(node: &Path, vdpa: VdpaOptions, options: BlkOptions) -> BlkDevice<VdpaTransport> {
    let t = open_transport_with(node, vdpa);
    BlkDevice::open(t, options).unwrap_or_else(|e| panic!("BlkDevice::open on {}: {e}", node.display()))
}

/// The node belongs to a vdpa device bound to `vhost_vdpa`.
pub fn check_vhost_vdpa_binding(node: &Path) {
    let name = node.file_name().and_then(|n| n.to_str()).unwrap_or_else(|| panic!("odd node {}", node.display()));
    let devices = std::fs::read_dir("/sys/bus/vdpa/devices").unwrap_or_else(|e| panic!("/sys/bus/vdpa: {e}"));
    let parent = devices
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|d| d.join(name).exists())
        .unwrap_or_else(|| panic!("no vdpa device has {name}"));
    assert_eq!(link_name(&parent, "driver").ok().as_deref(), Some("vhost_vdpa"), "{}", parent.display());
}

/// The node answers as a virtio-blk device with VERSION_1 and ACCESS_PLATFORM and a non-zero
/// capacity in its config space (raw ioctls, independent of the transport).
pub fn check_vhost_vdpa_blk(node: &Path) {
    check_vhost_vdpa_binding(node);
    let dev = VhostVdpa::open(node).unwrap_or_else(|e| panic!("open {}: {e}", node.display()));
    assert_eq!(dev.device_id().unwrap_or_else(|e| panic!("VHOST_VDPA_GET_DEVICE_ID: {e}")), VIRTIO_ID_BLOCK);
    let features = dev.features().unwrap_or_else(|e| panic!("VHOST_GET_FEATURES: {e}"));
    assert!(has_feature(features, F_VERSION_1), "features {features:#x} lack VERSION_1");
    assert!(has_feature(features, F_ACCESS_PLATFORM), "features {features:#x} lack ACCESS_PLATFORM");
    let capacity = dev.config(0, 8).unwrap_or_else(|e| panic!("VHOST_VDPA_GET_CONFIG: {e}"));
    let sectors = u64::from_le_bytes(capacity.try_into().unwrap_or_else(|_| panic!("short config read")));
    assert!(sectors > 0, "capacity is 0 sectors");
    eprintln!("{}: features {features:#x}, capacity {sectors} sectors", node.display());
}

/// Device id, config size (and the refusal of reads past it), queue count and size, the IOVA
/// window and the backend features, as the transport reports them.
pub fn check_transport_reports(node: &Path, kind: DeviceKind) {
    let mut t = open_transport(node);
    let info = *t.info();
    eprintln!("{}: {info:?}", node.display());
    assert_eq!(t.device_id(), VIRTIO_ID_BLOCK);
    assert!(info.config_size >= 24, "a virtio-blk config space has at least 24 bytes: {}", info.config_size);
    let (first, last) = info.iova_range;
    assert!(first < last, "IOVA range {first:#x}..={last:#x}");
    assert!(info.vring_num >= 64, "VHOST_VDPA_GET_VRING_NUM {}", info.vring_num);
    assert_eq!(u32::from(t.max_queues()), info.vqs_count);
    if kind == DeviceKind::Vduse {
        assert_eq!(t.max_queues(), 2, "qemu-storage-daemon exports num-queues=2");
    }
    assert_ne!(info.backend_features & backend_features::IOTLB_MSG_V2, 0, "6.12 offers IOTLB_MSG_V2");
    assert_eq!(info.backend_features & !info.backend_features_offered, 0);

    // Inside the config space: fine. One byte past it: refused before the ioctl.
    let mut buf = vec![0u8; info.config_size as usize];
    t.read_config(0, &mut buf).unwrap();
    let capacity = u64::from_le_bytes(buf[..8].try_into().unwrap());
    assert!(capacity > 0);
    let mut one = [0u8; 1];
    t.read_config(info.config_size - 1, &mut one).unwrap();
    let e = t.read_config(info.config_size - 3, &mut [0u8; 4]).unwrap_err();
    assert_eq!(e.step(), Step::Config);
    assert!(matches!(e.cause(), Cause::InvalidArgument(_)), "{e}");
    assert!(e.to_string().contains("VHOST_VDPA_GET_CONFIG_SIZE"), "{e}");
    let e = t.read_config(u32::MAX, &mut one).unwrap_err();
    assert_eq!(e.step(), Step::Config);

    let e = t.max_queue_size(t.max_queues()).unwrap_err();
    assert_eq!(e.step(), Step::Queue(t.max_queues()));
}

/// The status sequence goes to the device: FEATURES_OK reads back, reset is status 0; set-up
/// mappings are batched when the kernel offers IOTLB_BATCH, survive a reset, and leave nothing
/// behind when dropped.
pub fn check_status_and_mappings(node: &Path) {
    let mut t = open_transport(node);
    let iova_free = t.free_iova_bytes();
    let features = negotiate(&mut t, 0, 0).unwrap();
    assert_ne!(features & VirtioFeatures::VERSION_1.bits(), 0);
    let status = t.status().unwrap();
    assert!(
        status.contains(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK),
        "{status:?}"
    );

    // Refusals name their step: features after FEATURES_OK (the kernel says EBUSY), a queue
    // index the device lacks, ring addresses that are not mapped for the device.
    let e = t.set_driver_features(features).unwrap_err();
    assert_eq!((e.step(), e.raw_os_error()), (Step::Features, Some(libc::EBUSY)), "{e}");
    let n = t.max_queues();
    let unmapped = QueueAddresses { desc: 0x10_0000, driver: 0x20_0000, device: 0x30_0000 };
    let setup = QueueSetup { size: 64, format: RingFormat::Split, addresses: unmapped };
    let e = t.setup_queue(n, &setup).unwrap_err();
    assert_eq!(e.step(), Step::Queue(n));
    let e = t.setup_queue(0, &setup).unwrap_err();
    assert_eq!(e.step(), Step::Queue(0));
    assert!(e.to_string().contains("descriptor area at IOVA 0x100000 (+0x400) is not mapped for the device"), "{e}");
    let e = t.setup_queue(0, &QueueSetup { size: 48, ..setup }).unwrap_err();
    assert!(e.to_string().contains("size 48"), "{e}");

    let batch = t.info().backend_features & backend_features::IOTLB_BATCH != 0;
    assert!(!t.in_iotlb_batch(), "no update yet, no batch");
    let region = t.alloc_dma(3 * 4096 + 1).unwrap();
    assert_eq!(t.in_iotlb_batch(), batch, "set-up updates are batched when the kernel offers IOTLB_BATCH");
    assert_eq!(t.mappings(), 1);
    assert_eq!(region.iova() % 4096, 0);
    assert!(region.iova() >= t.info().iova_range.0 && region.iova() + region.len() as u64 - 1 <= t.info().iova_range.1);
    assert_eq!(t.translate(region.as_ptr().wrapping_add(5), 10), Some(region.iova() + 5));
    assert_eq!(t.translate(region.as_ptr().wrapping_add(region.len()), 1), None);

    t.reset().unwrap();
    // Without IOTLB_PERSIST the parent forgot the mapping at the reset and the transport sent it
    // again, as the first update of the next set-up batch.
    let persist = t.info().backend_features & backend_features::IOTLB_PERSIST != 0;
    assert_eq!(t.in_iotlb_batch(), batch && !persist, "after a reset (IOTLB_PERSIST: {persist})");
    assert_eq!(t.status().unwrap(), DeviceStatus::empty());
    assert_eq!(t.mappings(), 1, "mappings outlive a reset");
    let e = t.setup_queue(0, &setup).unwrap_err();
    assert!(e.to_string().contains("before FEATURES_OK"), "{e}");
    drop(region);
    assert_eq!(t.mappings(), 0);
    assert_eq!(t.free_iova_bytes(), iova_free, "every IOVA came back");
}

/// Anonymous and private memory is refused with the reason; a shared memfd mapping is taken.
pub fn check_memory_rules(node: &Path) {
    let t = open_transport(node);
    let page = 4096;
    // SAFETY: a new private anonymous mapping, unmapped at the end; nothing else is touched.
    let anon = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            page,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(anon, libc::MAP_FAILED);
    let m = MemFd::new("vdpa-test", 4 * page).unwrap();
    // SAFETY: the contract holds for what is accepted (the memfd mapping stays until unmapped
    // below); the anonymous range must be refused, so nothing maps it.
    let e = unsafe { t.map_memory(anon.cast(), page, m.as_fd(), 0) }.unwrap_err();
    assert_eq!(e.step(), Step::Memory);
    let s = e.to_string();
    assert!(s.contains("vhost-vdpa needs shared, file-backed memory (memfd)") && s.contains("is anonymous"), "{s}");

    // A private mapping of the memfd: refused too.
    // SAFETY: a new private mapping of our memfd, unmapped at the end.
    let private = unsafe {
        libc::mmap(std::ptr::null_mut(), page, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE, m.as_raw_fd(), 0)
    };
    assert_ne!(private, libc::MAP_FAILED);
    // SAFETY: as above; refused.
    let e = unsafe { t.map_memory(private.cast(), page, m.as_fd(), 0) }.unwrap_err();
    assert!(e.to_string().contains("is a private mapping of /memfd:vdpa-test"), "{e}");

    // The memfd's shared mapping, from its second page: taken, with the right offset.
    let addr = m.as_ptr().wrapping_add(page + 16);
    // SAFETY: `addr .. addr + 2 * page` is inside `m`'s shared mapping at file offset
    // page + 16, and stays mapped until unmap_memory below.
    let iova = unsafe { t.map_memory(addr, 2 * page, m.as_fd(), page as u64 + 16) }.unwrap();
    assert_eq!(iova % page as u64, 16);
    assert_eq!(t.translate(addr.wrapping_add(100), 8), Some(iova + 100));
    // The wrong offset for the same memory: refused.
    // SAFETY: refused, nothing is mapped.
    let e = unsafe { t.map_memory(m.as_ptr(), page, m.as_fd(), 8192) }.unwrap_err();
    assert!(e.to_string().contains("not 0x2000"), "{e}");
    // SAFETY: nothing uses the mapping.
    unsafe { t.unmap_memory(addr) }.unwrap();
    // SAFETY: as above; a second unmap is refused.
    assert!(unsafe { t.unmap_memory(addr) }.is_err());
    assert_eq!(t.mappings(), 0);
    // SAFETY: the mappings made above, no longer used.
    unsafe {
        libc::munmap(anon, page);
        libc::munmap(private, page);
    }
}

/// Caller memory mapped with `map_memory` (a memfd the test owns) carries raw reads and
/// writes: the device really sees it at the IOVA the transport handed out.
pub fn check_mapped_memory_io(node: &Path) {
    let mut dev = open_blk(node, BlkOptions::default());
    let seg = 4096usize;
    let m = MemFd::new("vdpa-user-buffer", 2 * seg).unwrap();
    let t = dev.transport();
    // SAFETY: `m`'s shared mapping stays until unmap_memory below; it is accessed only by
    // raw pointers, and not while a request using it is in flight.
    let iova = unsafe { t.map_memory(m.as_ptr(), 2 * seg, m.as_fd(), 0) }.unwrap();
    let data = pattern(3 << 20, seg, 5);
    // SAFETY: the first page of `m` is mapped and nothing else uses it now.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), m.as_ptr(), seg) };
    let mut q = dev.take_queue(0).unwrap();
    // SAFETY: `iova .. iova + seg` is device-visible and untouched until the completion.
    unsafe { q.submit_write_raw(3 << 20, iova, seg as u32, 1) }.unwrap();
    let c = q.wait(Some(std::time::Duration::from_secs(10))).expect("the write completes");
    c.result.unwrap();
    // SAFETY: the second page, likewise.
    unsafe { q.submit_read_raw(3 << 20, iova + seg as u64, seg as u32, 2) }.unwrap();
    let c = q.wait(Some(std::time::Duration::from_secs(10))).expect("the read completes");
    c.result.unwrap();
    let mut back = vec![0u8; seg];
    // SAFETY: the read completed; the second page of `m` is ours again.
    unsafe { std::ptr::copy_nonoverlapping(m.as_ptr().add(seg), back.as_mut_ptr(), seg) };
    assert!(back == data, "the device read and wrote the caller's memfd at its IOVA");
    drop(q);
    // SAFETY: no request is in flight.
    unsafe { dev.transport().unmap_memory(m.as_ptr()) }.unwrap();
}

/// A deterministic pattern for `len` bytes at `offset`.
pub fn pattern(offset: u64, len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| ((offset as usize + i) as u8).wrapping_mul(31).wrapping_add(seed) ^ ((i >> 9) as u8)).collect()
}

/// Compares `expected` with the backing file at `offset`.
pub fn check_image(image: &Path, offset: u64, expected: &[u8]) {
    let f = std::fs::File::open(image).unwrap_or_else(|e| panic!("{}: {e}", image.display()));
    let mut got = vec![0u8; expected.len()];
    f.read_exact_at(&mut got, offset).unwrap_or_else(|e| panic!("{} at {offset}: {e}", image.display()));
    if got != expected {
        let first = got.iter().zip(expected).position(|(a, b)| a != b).unwrap_or(0);
        let differing = got.iter().zip(expected).filter(|(a, b)| a != b).count();
        let zeros = got.iter().filter(|&&b| b == 0).count();
        panic!(
            "{} at {offset}: the file differs from what was written: {differing} of {} bytes, first at +{first} \
             (file {:02x?}, written {:02x?}); {zeros} zero bytes in the file",
            image.display(),
            got.len(),
            &got[first..(first + 16).min(got.len())],
            &expected[first..(first + 16).min(got.len())],
        );
    }
}

/// Write, read back, flush through `BlkDevice`; against the backing file when there is one.
pub fn check_round_trips(node: &Path, image: Option<&Path>, options: BlkOptions) {
    check_round_trips_with(node, image, VdpaOptions::default(), options);
}

/// [`check_round_trips`] with transport options.
pub fn check_round_trips_with(node: &Path, image: Option<&Path>, vdpa: VdpaOptions, options: BlkOptions) {
    let mut dev = open_blk_with(node, vdpa, options);
    let capacity = dev.capacity();
    let bs = u64::from(dev.block_size());
    eprintln!("{}: {dev:?}", node.display());
    assert!(capacity >= 1 << 20, "capacity {capacity}");
    let mut q = dev.take_queue(0).unwrap();
    // Disjoint ranges: the file is compared with every one of them at the end.
    let cases = [(0u64, 4096usize), (65536 + bs * 3, 512 * 7), (1 << 20, 300 * 1024), (capacity - 8192, 8192)];
    for (i, &(offset, len)) in cases.iter().enumerate() {
        let data = pattern(offset, len, i as u8);
        q.write_at(offset, &data).unwrap_or_else(|e| panic!("write {len} at {offset}: {e}"));
        let mut back = vec![0u8; len];
        q.read_at(offset, &mut back).unwrap_or_else(|e| panic!("read {len} at {offset}: {e}"));
        assert!(back == data, "read back {len} bytes at {offset}: differs");
    }
    if dev.blk_features().contains(BlkFeatures::FLUSH) {
        q.flush().unwrap();
    }
    if let Some(image) = image {
        for (i, &(offset, len)) in cases.iter().enumerate() {
            check_image(image, offset, &pattern(offset, len, i as u8));
        }
    }
    // Out of range: refused before the ring.
    let mut past = vec![0u8; 512];
    assert!(q.read_at(capacity, &mut past).is_err());
}

/// Dropping the device releases the node (single opener) even while a buffer it allocated
/// is still alive, and the data is there for the next opener.
pub fn check_drop_releases(node: &Path) {
    let data = pattern(8192, 4096, 77);
    let buf;
    {
        let mut dev = open_blk(node, BlkOptions::default());
        buf = dev.alloc_buf(4096).unwrap();
        let mut q = dev.take_queue(0).unwrap();
        q.write_at(8192, &data).unwrap();
    }
    let mut dev = open_blk(node, BlkOptions::default());
    let mut q = dev.take_queue(0).unwrap();
    let mut back = vec![0u8; 4096];
    q.read_at(8192, &mut back).unwrap();
    assert!(back == data, "data written before the reopen");
    drop(buf);
}

/// The checks every vhost-vdpa device gets, as a module named after its phase prefix: the
/// transport-level checks above, then the shared operation suite of `virtio-blk-dev`
/// (`queues`: the request queues the device offers).
macro_rules! vhost_vdpa_tests {
    ($module:ident, $kind:expr, queues = $queues:expr) => {
        mod $module {
            use transport_vdpa::VdpaOptions;
            use virtio_blk_dev::BlkOptions;
            use vm_tests::{device_or_skip, DeviceKind};
            use $crate::vdpa::*;

            #[test]
            fn answers_as_virtio_blk_with_access_platform() {
                let node = device_or_skip!($kind);
                check_vhost_vdpa_blk(&node);
            }

            #[test]
            fn transport_reports_id_config_size_queues_and_iova_range() {
                let node = device_or_skip!($kind);
                check_transport_reports(&node, $kind);
            }

            #[test]
            fn status_sequence_and_mappings_without_leaks() {
                let node = device_or_skip!($kind);
                check_status_and_mappings(&node);
            }

            #[test]
            fn anonymous_and_private_memory_refused_memfd_taken() {
                let node = device_or_skip!($kind);
                check_memory_rules(&node);
            }

            #[test]
            fn blk_round_trips() {
                let node = device_or_skip!($kind);
                check_round_trips(&node, image_of($kind).as_deref(), BlkOptions::default());
            }

            #[test]
            fn blk_round_trips_unbatched_iotlb_plain_rings() {
                let node = device_or_skip!($kind);
                let options = BlkOptions { event_idx: false, indirect: false, ..BlkOptions::default() };
                let vdpa = VdpaOptions { iotlb_batch: false };
                check_round_trips_with(&node, image_of($kind).as_deref(), vdpa, options);
            }

            #[test]
            fn caller_memfd_mapped_with_map_memory_carries_io() {
                let node = device_or_skip!($kind);
                check_mapped_memory_io(&node);
            }

            #[test]
            fn drop_releases_the_device() {
                let node = device_or_skip!($kind);
                check_drop_releases(&node);
            }

            #[test]
            fn vblk_info_verify_and_bench() {
                let node = device_or_skip!($kind);
                lift_memlock_limit();
                let node = node.to_str().expect("a UTF-8 device node");
                $crate::cli::info_verify_and_bench(&["--vdpa", node], $queues);
            }

            /// The device for the operation suite: every scenario opens it afresh.
            fn open(options: BlkOptions) -> virtio_blk_dev::BlkDevice<transport_vdpa::VdpaTransport> {
                let node = match vm_tests::lookup($kind) {
                    Ok(Some(node)) => node,
                    Ok(None) => panic!("{} not available: {} is unset", $kind, $kind.env_var()),
                    Err(e) => panic!("{e}"),
                };
                open_blk(&node, options)
            }

            // vdpa_sim (vringh) and qemu-storage-daemon's VDUSE export (libvduse) offer split
            // rings only; the suite checks that a driver asking for packed falls back.
            virtio_blk_dev::operation_suite!(open, image = image_of($kind), packed = false, queues = $queues);
        }
    };
}
