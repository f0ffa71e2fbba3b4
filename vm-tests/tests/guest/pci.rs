//! virtio-blk-pci with ACCESS_PLATFORM, bound to vfio-pci (phase `va`): transport-pci's
//! driver tests, then the shared operation suite.

use std::path::PathBuf;
use std::time::Duration;

use transport_pci::{Interrupts, PciOptions, PciTransport, QueueInterrupt};
use virtio_blk_dev::{suite, BlkDevice, BlkError, BlkOptions};
use virtio_transport_api::{negotiate, Cause, QueueAddresses, QueueSetup, RingFormat, Step, Transport, VirtioFeatures};
use vm_tests::{device_or_skip, DeviceKind};

/// The device path for the operation suite's `open` (which cannot return early): the suite
/// runs only in the vm-test guest, where the device is required.
fn device_path() -> PathBuf {
    match vm_tests::lookup(DeviceKind::Pci) {
        Ok(Some(p)) => p,
        Ok(None) => panic!("VIRTIO_TEST_PCI is unset: the PCI operation suite runs only in the vm-test guest"),
        Err(e) => panic!("{e}"),
    }
}

fn open_transport(dev: &std::path::Path, options: PciOptions) -> PciTransport {
    let path = dev.to_str().expect("a UTF-8 sysfs path");
    PciTransport::open(path, options).unwrap_or_else(|e| panic!("open {path}: {e}"))
}

fn open(options: BlkOptions) -> BlkDevice<PciTransport> {
    let t = open_transport(&device_path(), PciOptions::default());
    BlkDevice::open(t, options).unwrap_or_else(|e| panic!("BlkDevice::open on PCI: {e}"))
}

/// Writes `len` bytes of a pattern at `offset` and reads them back through the blocking layer.
fn round_trip(q: &mut virtio_blk_dev::BlkQueue<PciTransport>, offset: u64, len: usize, seed: u32) {
    let data = suite::pattern(seed, len);
    q.write_at(offset, &data).unwrap_or_else(|e| panic!("write {len} bytes at {offset}: {e}"));
    let mut back = vec![0u8; len];
    q.read_at(offset, &mut back).unwrap_or_else(|e| panic!("read {len} bytes at {offset}: {e}"));
    assert!(back == data, "data read back at {offset} differs from what was written");
}

#[test]
fn open_finds_a_modern_block_device_with_two_queues_and_msix() {
    let dev = device_or_skip!(DeviceKind::Pci);
    let mut t = open_transport(&dev, PciOptions::default());
    assert_eq!(t.device_id(), 2, "virtio-blk");
    assert_eq!(t.identity().pci_device_id, 0x1042);
    assert_eq!(t.max_queues(), 2);
    assert!(t.max_queue_size(0).unwrap() >= 128);
    assert!(t.capabilities().device.is_some(), "virtio-blk has a device configuration");
    let offered = t.offered_features();
    assert_ne!(offered & VirtioFeatures::ACCESS_PLATFORM.bits(), 0);
    assert_ne!(offered & VirtioFeatures::VERSION_1.bits(), 0);
    assert_eq!(t.msix_error(), None);
    assert_eq!(t.vector_plan().vectors, 3, "config + one per queue");
    assert!(t.config_event().is_some());
    let windows = t.iommu_info().windows();
    assert!(!windows.is_empty());
    eprintln!("IOVA windows {windows:x?}, caps {:?}", t.capabilities());
    // DMA memory: page-aligned IOVAs inside the reported windows; zero bytes is refused.
    let r = t.alloc_dma(10_000).unwrap();
    assert_eq!(r.len(), 12288);
    assert_eq!(r.iova() % 4096, 0);
    assert!(windows.iter().any(|w| w.contains(&r.iova()) && w.contains(&(r.iova() + r.len() as u64 - 1))));
    assert_eq!(t.translate(r.as_ptr(), r.len()), Some(r.iova()));
    let e = t.alloc_dma(0).unwrap_err();
    assert!(matches!(e.cause(), Cause::InvalidArgument(_)) && e.step() == Step::Memory, "{e}");
    // A fresh reset reads 0.
    t.reset().unwrap();
    assert!(t.status().unwrap().is_empty());
    // Out-of-range queue and config reads are typed errors.
    let e = t.max_queue_size(2).unwrap_err();
    assert!(matches!(e.cause(), Cause::InvalidArgument(_)) && e.step() == Step::Queue(2), "{e}");
    let len = t.capabilities().device.unwrap().length;
    let e = t.read_config(len - 2, &mut [0u8; 4]).unwrap_err();
    assert!(matches!(e.cause(), Cause::InvalidArgument(_)) && e.step() == Step::Config, "{e}");
    let mut capacity = [0u8; 8];
    t.read_config(0, &mut capacity).unwrap();
    assert_eq!(u64::from_le_bytes(capacity), 64 << 20 >> 9, "the 64 MiB disk, in sectors");
}

#[test]
fn read_write_flush_through_blk_device() {
    let dev = device_or_skip!(DeviceKind::Pci);
    let t = open_transport(&dev, PciOptions::default());
    let mut blk = BlkDevice::open(t, BlkOptions::default()).unwrap();
    assert_eq!(blk.capacity(), 64 << 20);
    assert_eq!(blk.transport().queue_interrupt(0), Some(QueueInterrupt::Msix(1)));
    let mut q = blk.take_queue(0).unwrap();
    round_trip(&mut q, 0, 4096, 1);
    round_trip(&mut q, 1 << 20, 300 * 1024, 2); // larger than the bounce buffer: split
    round_trip(&mut q, (64 << 20) - 512, 512, 3); // the last sector
    q.flush().unwrap();
    let e = q.read_at(64 << 20, &mut [0u8; 512]).unwrap_err();
    assert!(matches!(e, BlkError::OutOfRange { .. }), "{e}");
}

#[test]
fn two_queues_from_two_threads() {
    let dev = device_or_skip!(DeviceKind::Pci);
    let t = open_transport(&dev, PciOptions::default());
    let mut blk = BlkDevice::open(t, BlkOptions { num_queues: 2, ..Default::default() }).unwrap();
    assert_eq!(blk.num_queues(), 2);
    assert_eq!(blk.transport().queue_interrupt(1), Some(QueueInterrupt::Msix(2)));
    let queues = blk.queues();
    let threads: Vec<_> = queues
        .into_iter()
        .enumerate()
        .map(|(i, mut q)| {
            std::thread::spawn(move || {
                let base = (i as u64 + 1) * (8 << 20);
                for n in 0..64u32 {
                    round_trip(&mut q, base + u64::from(n) * 8192, 8192, n * 2 + i as u32);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a queue thread failed");
    }
}

#[test]
fn polling_fallback_completes_requests() {
    let dev = device_or_skip!(DeviceKind::Pci);
    let options =
        PciOptions { interrupts: Interrupts::Polling, poll_interval: Duration::from_micros(500), ..Default::default() };
    let t = open_transport(&dev, options);
    assert_eq!(t.vector_plan().vectors, 0);
    let mut blk = BlkDevice::open(t, BlkOptions { num_queues: 2, ..Default::default() }).unwrap();
    assert_eq!(blk.transport().queue_interrupt(0), Some(QueueInterrupt::Polling));
    assert_eq!(blk.transport().queue_interrupt(1), Some(QueueInterrupt::Polling));
    let mut q = blk.take_queue(1).unwrap();
    for n in 0..16 {
        round_trip(&mut q, 4 << 20, 16384, 100 + n);
    }
    q.flush().unwrap();
}

#[test]
fn caller_memory_is_mapped_translated_and_unmapped() {
    let dev = device_or_skip!(DeviceKind::Pci);
    let t = open_transport(&dev, PciOptions::default());
    let mut blk = BlkDevice::open(t, BlkOptions::default()).unwrap();
    // Anonymous, private memory: VFIO pins it, so it works (unlike vhost-vdpa's VA mode).
    let len = 64 * 1024;
    // SAFETY: a new private anonymous mapping, unmapped at the end of the test.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    let p = p.cast::<u8>();
    let data = suite::pattern(7, len);
    // SAFETY: `p` has `len` bytes; nothing else uses them.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, len) };
    let null = std::fs::File::open("/dev/null").unwrap();
    let fd = std::os::fd::AsFd::as_fd(&null);
    // SAFETY: the mapping stays until it is unmapped below, after the requests completed.
    let iova = unsafe { blk.transport().map_memory(p, len, fd, 0) }.unwrap();
    assert_eq!(blk.transport().translate(p, len), Some(iova));
    // SAFETY: in bounds of the mapping.
    assert_eq!(blk.transport().translate(unsafe { p.add(4096) }, 100), Some(iova + 4096));
    assert_eq!(blk.transport().translate(p, len + 1), None);
    // Overlapping a live mapping is refused.
    // SAFETY: refused before anything is mapped.
    let e = unsafe { blk.transport().map_memory(p.add(4096), 4096, fd, 0) }.unwrap_err();
    assert!(matches!(e.cause(), Cause::InvalidArgument(_)), "{e}");

    let mut q = blk.take_queue(0).unwrap();
    // SAFETY: `iova .. iova + len` is mapped and untouched until the completion.
    unsafe { q.submit_write_raw(2 << 20, iova, len as u32, 1) }.unwrap();
    suite::next(&mut q).result.unwrap();
    // SAFETY: as above; the device overwrites the buffer with what was written.
    unsafe { std::ptr::write_bytes(p, 0, len) };
    // SAFETY: as above.
    unsafe { q.submit_read_raw(2 << 20, iova, len as u32, 2) }.unwrap();
    suite::next(&mut q).result.unwrap();
    let mut back = vec![0u8; len];
    // SAFETY: the request completed; `p` has `len` bytes.
    unsafe { std::ptr::copy_nonoverlapping(p, back.as_mut_ptr(), len) };
    assert!(back == data, "data through caller memory");

    // SAFETY: no request uses the memory any more.
    unsafe { blk.transport().unmap_memory(p) }.unwrap();
    assert_eq!(blk.transport().translate(p, 1), None);
    // SAFETY: as above.
    let e = unsafe { blk.transport().unmap_memory(p) }.unwrap_err();
    assert!(matches!(e.cause(), Cause::InvalidArgument(_)), "a second unmap: {e}");
    drop(q);
    drop(blk);
    // SAFETY: the mapping made above; the device was reset and everything unmapped.
    unsafe { libc::munmap(p.cast(), len) };
}

#[test]
fn queue_setup_refuses_bad_arguments() {
    let dev = device_or_skip!(DeviceKind::Pci);
    let mut t = open_transport(&dev, PciOptions::default());
    let ring = t.alloc_dma(64 * 1024).unwrap();
    let addresses = QueueAddresses { desc: ring.iova(), driver: ring.iova() + 4096, device: ring.iova() + 8192 };
    let good = QueueSetup { size: 64, format: RingFormat::Split, addresses };
    // Before FEATURES_OK.
    let e = t.setup_queue(0, &good).unwrap_err();
    assert!(matches!(e.cause(), Cause::InvalidArgument(_)), "{e}");
    let features = negotiate(&mut t, 0, 0).unwrap();
    // ACCESS_PLATFORM is the transport's own bit (Transport::transport_features): negotiate
    // accepts it although the caller did not ask, and the device holds it in its driver
    // features, read back from the common configuration.
    assert_eq!(features, VirtioFeatures::VERSION_1.bits() | VirtioFeatures::ACCESS_PLATFORM.bits());
    assert_eq!(t.driver_features(), VirtioFeatures::VERSION_1.bits() | VirtioFeatures::ACCESS_PLATFORM.bits());
    for (index, setup, what) in [
        (2, good, "no such queue"),
        (0, QueueSetup { size: 48, ..good }, "split size not a power of two"),
        (0, QueueSetup { size: 0, ..good }, "size 0"),
        (0, QueueSetup { size: 32768, ..good }, "above the maximum"),
        (0, QueueSetup { format: RingFormat::Packed, ..good }, "packed not negotiated"),
        (
            0,
            QueueSetup { addresses: QueueAddresses { desc: ring.iova() + (1 << 30), ..addresses }, ..good },
            "unmapped IOVA",
        ),
    ] {
        let e = t.setup_queue(index, &setup).unwrap_err();
        assert!(matches!(e.cause(), Cause::InvalidArgument(_)), "{what}: {e}");
        assert_eq!(e.step(), Step::Queue(index), "{what}");
    }
    t.setup_queue(0, &good).unwrap();
    let e = t.setup_queue(0, &good).unwrap_err();
    assert!(e.to_string().contains("already set up"), "{e}");
    // Features cannot change after FEATURES_OK.
    assert!(t.set_driver_features(VirtioFeatures::VERSION_1.bits()).is_err());
    drop(t);
    drop(ring);
}

#[test]
fn dma_regions_may_outlive_the_transport() {
    let dev = device_or_skip!(DeviceKind::Pci);
    let t = open_transport(&dev, PciOptions::default());
    let a = t.alloc_dma(4096).unwrap();
    let b = t.alloc_dma(8192).unwrap();
    let iova = b.iova();
    drop(b);
    // The IOVA range came back: the next region of that size may reuse it.
    let c = t.alloc_dma(8192).unwrap();
    assert_eq!(c.iova(), iova, "first fit reuses the freed range");
    // Dropping the transport resets the device and unmaps everything; the regions still
    // alive free their memory later without touching the IOMMU again.
    drop(t);
    assert!(a.shared_memory().write_bytes(0, b"still ours"));
    drop(a);
    drop(c);
}

/// `PCI_COMMAND` as the kernel reads it from the device (sysfs `config`).
fn pci_command(dev: &std::path::Path) -> u16 {
    let config = std::fs::read(dev.join("config")).unwrap_or_else(|e| panic!("read {}/config: {e}", dev.display()));
    u16::from_le_bytes([config[4], config[5]])
}

#[test]
fn bus_mastering_is_on_only_while_the_transport_lives() {
    let dev = device_or_skip!(DeviceKind::Pci);
    const MASTER: u16 = 0x4;
    let t = open_transport(&dev, PciOptions::default());
    assert_ne!(pci_command(&dev) & MASTER, 0, "bus mastering on while open");
    drop(t);
    assert_eq!(pci_command(&dev) & MASTER, 0, "bus mastering off after drop");
}

#[test]
fn a_second_open_while_in_use_is_refused() {
    let dev = device_or_skip!(DeviceKind::Pci);
    let first = open_transport(&dev, PciOptions::default());
    let path = dev.to_str().unwrap();
    let e = PciTransport::open(path, PciOptions::default()).expect_err("the group is in use");
    assert_eq!(e.step(), Step::Connect, "{e}");
    assert_eq!(e.raw_os_error(), Some(libc::EBUSY), "{e}");
    eprintln!("refused as expected: {e}");
    drop(first);
    PciTransport::open(path, PciOptions::default()).unwrap_or_else(|e| panic!("open after the first one closed: {e}"));
}

#[test]
fn the_device_can_be_opened_again_after_drop() {
    let dev = device_or_skip!(DeviceKind::Pci);
    for round in 0..3u32 {
        let t = open_transport(&dev, PciOptions::default());
        let mut blk = BlkDevice::open(t, BlkOptions::default()).unwrap();
        let mut q = blk.take_queue(0).unwrap();
        round_trip(&mut q, 6 << 20, 4096, round);
    }
}

#[test]
fn vblk_info_verify_and_bench() {
    let dev = device_or_skip!(DeviceKind::Pci);
    crate::cli::info_verify_and_bench(&["--pci", dev.to_str().expect("a UTF-8 sysfs path")], 2);
}

/// Writes the region `cargo xtask vm-test` checks in the host's disk image after QEMU exits
/// (`vm_tests::host_disk`): the data went through transport-pci, the guest IOMMU and QEMU's
/// virtio-blk into the file, not just into a cache the driver reads back.
#[test]
fn data_reaches_the_host_disk() {
    let _dev = device_or_skip!(DeviceKind::Pci);
    let mut dev = open(BlkOptions::default());
    let mut q = dev.take_queue(0).expect("queue 0");
    let data = vm_tests::host_disk::pattern();
    q.write_at(vm_tests::host_disk::OFFSET, &data).unwrap_or_else(|e| panic!("write the host-disk region: {e}"));
    q.flush().unwrap_or_else(|e| panic!("flush: {e}"));
    let mut back = vec![0u8; data.len()];
    q.read_at(vm_tests::host_disk::OFFSET, &mut back).unwrap_or_else(|e| panic!("read it back: {e}"));
    assert!(back == data, "the region reads back as written");
}

virtio_blk_dev::operation_suite!(open, image = None, packed = true, queues = 2);
