//! Against `qemu-storage-daemon --export type=vhost-user-blk` over a raw image file
//! (Debian package `qemu-utils`).

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
    queues_on_threads(&mut dev, 2);
}

#[test]
fn killed_with_requests_in_flight() {
    let s = Scratch::new();
    let mut d = Qsd::start(&s, 1, true);
    let mut dev = open(&s.sock, BlkOptions::default());
    in_flight_when_backend_dies(&mut dev, move || d.kill());
}
