//! Against `qemu-storage-daemon --export type=vhost-user-blk` over a raw image file
//! (Debian package `qemu-system-common` in bookworm; a backported `qemu-utils` also ships it).

mod common;

use common::*;
use virtio_blk_dev::{BlkFeatures, BlkOptions};

#[test]
fn every_operation_on_qsd() {
    let s = Scratch::new();
    let _d = Qsd::start(&s, 1, true);
    let mut dev = open(&s.sock, BlkOptions::default());
    assert_eq!(dev.capacity(), IMAGE_BYTES);
    assert_eq!(dev.ring_features() & virtio_queue_core::RingFeatures::RING_PACKED, Default::default());
    every_operation(&mut dev, Some(&s.image));
}

/// qemu-storage-daemon's vhost-user-blk export (libvhost-user) does not offer
/// VIRTIO_F_RING_PACKED: a driver that would take packed rings negotiates split ones there.
/// Packed rings over vhost-user are tested against the embedded server (`embedded.rs`).
#[test]
fn qsd_offers_split_rings_only_and_the_driver_falls_back() {
    use transport_vhost_user::{VhostUserOptions, VhostUserTransport};
    use virtio_queue_core::{RingFeatures, RingFormat};
    use virtio_transport_api::{Transport, VirtioFeatures};

    let s = Scratch::new();
    let _d = Qsd::start(&s, 1, true);
    let mut t = VhostUserTransport::connect(&s.sock, VhostUserOptions::default()).unwrap();
    let offered = t.device_features().unwrap();
    assert_eq!(offered & VirtioFeatures::RING_PACKED.bits(), 0, "offered {offered:#x}");
    assert_ne!(offered & VirtioFeatures::EVENT_IDX.bits(), 0, "offered {offered:#x}");
    let mut dev = virtio_blk_dev::BlkDevice::open(t, BlkOptions { packed: true, ..Default::default() }).unwrap();
    assert!(!dev.ring_features().contains(RingFeatures::RING_PACKED));
    let mut q = dev.take_queue(0).unwrap();
    assert_eq!(q.format(), RingFormat::Split);
    q.write_at(0, &[3u8; 4096]).unwrap();
}

#[test]
fn without_event_idx() {
    let s = Scratch::new();
    let _d = Qsd::start(&s, 1, true);
    let mut dev = open(&s.sock, BlkOptions { event_idx: false, refuse: BlkFeatures::DISCARD, ..Default::default() });
    assert!(!dev.blk_features().contains(BlkFeatures::DISCARD));
    every_operation(&mut dev, Some(&s.image));
}

#[test]
fn read_only_export_refuses_writes_before_submission() {
    let s = Scratch::new();
    let _d = Qsd::start(&s, 1, false);
    let mut dev = open(&s.sock, BlkOptions::default());
    read_only_refuses_writes(&mut dev);
}

#[test]
fn two_queues_from_two_threads() {
    let s = Scratch::new();
    let _d = Qsd::start(&s, 2, true);
    let mut dev = open(&s.sock, BlkOptions { num_queues: 2, ..Default::default() });
    queues_on_threads(&mut dev, 2, Some(&s.image));
}

#[test]
fn killed_with_requests_in_flight() {
    let s = Scratch::new();
    let mut d = Qsd::start(&s, 1, true);
    let mut dev = open(&s.sock, BlkOptions::default());
    in_flight_when_backend_dies(&mut dev, move || d.kill());
}

#[test]
fn a_stopped_daemon_fails_blocking_calls_after_the_io_timeout() {
    let s = Scratch::new();
    let d = Qsd::start(&s, 1, true);
    let options = BlkOptions { io_timeout: Some(std::time::Duration::from_millis(300)), ..Default::default() };
    let mut dev = open(&s.sock, options);
    let mut q = dev.take_queue(0).unwrap();
    let mut buf = vec![0u8; 4096];
    q.read_at(0, &mut buf).unwrap();
    // SIGSTOP: the socket stays open but nothing is served.
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { kill(d.child.id() as i32, 19) }, 0);
    let start = std::time::Instant::now();
    let e = q.read_at(0, &mut buf).unwrap_err();
    assert!(matches!(&e, virtio_blk_dev::BlkError::Transport(t) if t.is_disconnected()), "{e}");
    assert!(e.to_string().contains("no completion within"), "{e}");
    assert!(start.elapsed() < std::time::Duration::from_secs(3), "took {:?}", start.elapsed());
    // Later calls fail fast.
    assert!(q.write_at(0, &buf).is_err());
    // SAFETY: as above; SIGCONT so the kill on drop is delivered promptly.
    unsafe { kill(d.child.id() as i32, 18) };
}

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

#[test]
fn four_queues_from_four_threads() {
    let s = Scratch::new();
    let _d = Qsd::start(&s, 4, true);
    let mut dev = open(&s.sock, BlkOptions { num_queues: 4, ..Default::default() });
    queues_on_threads(&mut dev, 4, Some(&s.image));
}
