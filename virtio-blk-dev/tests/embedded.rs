//! Against the embedded vhost-user-blk server of `vblk` (RAM and image file).

mod common;

use common::*;
use vblk::server::{Server, ServerOptions, Storage};
use virtio_blk_dev::{BlkOptions, RequestKind};

fn start(s: &Scratch, options: ServerOptions) -> vblk::server::ServerHandle {
    Server::start(&s.sock, options).unwrap()
}

#[test]
fn every_operation_on_ram() {
    let s = Scratch::new();
    let _srv = start(&s, ServerOptions { storage: Storage::Ram { size: IMAGE_BYTES }, ..Default::default() });
    let mut dev = open(&s.sock, BlkOptions::default());
    assert_eq!(dev.capacity(), IMAGE_BYTES);
    assert_eq!(dev.block_size(), 512);
    every_operation(&mut dev, None);
}

#[test]
fn every_operation_on_an_image_file() {
    let s = Scratch::new();
    let _srv = start(&s, ServerOptions { storage: Storage::Image(s.image.clone()), ..Default::default() });
    let mut dev = open(&s.sock, BlkOptions::default());
    every_operation(&mut dev, Some(&s.image));
}

#[test]
fn without_indirect_and_event_idx() {
    let s = Scratch::new();
    let _srv = start(&s, ServerOptions { storage: Storage::Image(s.image.clone()), ..Default::default() });
    let options = BlkOptions { indirect: false, event_idx: false, ..Default::default() };
    let mut dev = open(&s.sock, options);
    assert_eq!(dev.ring_features(), virtio_queue_core::RingFeatures::empty());
    every_operation(&mut dev, Some(&s.image));
}

#[test]
fn data_written_to_the_file_is_read_by_the_driver() {
    let s = Scratch::new();
    let data = pattern(9, 4096);
    write_file(&s.image, 8192, &data);
    let _srv = start(&s, ServerOptions { storage: Storage::Image(s.image.clone()), ..Default::default() });
    let mut dev = open(&s.sock, BlkOptions::default());
    let mut q = dev.take_queue(0).unwrap();
    let mut back = vec![0u8; 4096];
    q.read_at(8192, &mut back).unwrap();
    assert_eq!(back, data);
}

#[test]
fn read_only_export_refuses_writes_before_submission() {
    let s = Scratch::new();
    let options = ServerOptions { storage: Storage::Image(s.image.clone()), read_only: true, ..Default::default() };
    let _srv = start(&s, options);
    let mut dev = open(&s.sock, BlkOptions::default());
    read_only_refuses_writes(&mut dev);
}

#[test]
fn two_queues_from_two_threads() {
    let s = Scratch::new();
    let options = ServerOptions { storage: Storage::Ram { size: IMAGE_BYTES }, queues: 2, ..Default::default() };
    let _srv = start(&s, options);
    let mut dev = open(&s.sock, BlkOptions { num_queues: 2, ..Default::default() });
    queues_on_threads(&mut dev, 2);
}

#[test]
fn asking_for_more_queues_than_offered_gets_the_offered_count() {
    let s = Scratch::new();
    let options = ServerOptions { storage: Storage::Ram { size: IMAGE_BYTES }, queues: 2, ..Default::default() };
    let _srv = start(&s, options);
    let dev = open(&s.sock, BlkOptions { num_queues: 8, ..Default::default() });
    assert_eq!(dev.num_queues(), 2);
}

#[test]
fn a_full_queue_is_reported_and_drains() {
    let s = Scratch::new();
    let _srv = start(&s, ServerOptions { storage: Storage::Ram { size: IMAGE_BYTES }, ..Default::default() });
    let mut dev = open(&s.sock, BlkOptions { queue_size: 8, ..Default::default() });
    let mut bufs = dev.alloc_bufs(512, 9).unwrap();
    let mut q = dev.take_queue(0).unwrap();
    assert_eq!(q.queue_size(), 8);
    for i in 0..8 {
        q.submit_read(i * 512, bufs.pop().unwrap(), i).unwrap();
    }
    let e = q.submit_read(0, bufs.pop().unwrap(), 99).unwrap_err();
    assert!(matches!(e.error, virtio_blk_dev::BlkError::QueueFull), "{}", e.error);
    let mut tags = Vec::new();
    while let Some(c) = q.wait(Some(std::time::Duration::from_secs(10))) {
        assert_eq!(c.kind, RequestKind::Read);
        c.result.unwrap();
        tags.push(c.tag);
    }
    tags.sort();
    assert_eq!(tags, (0..8).collect::<Vec<_>>());
}

#[test]
fn server_shutdown_with_requests_in_flight() {
    let s = Scratch::new();
    let srv = start(&s, ServerOptions { storage: Storage::Ram { size: IMAGE_BYTES }, ..Default::default() });
    let mut dev = open(&s.sock, BlkOptions::default());
    in_flight_when_backend_dies(&mut dev, move || srv.shutdown());
}

#[test]
fn four_queues_from_four_threads() {
    let s = Scratch::new();
    let options = ServerOptions { storage: Storage::Ram { size: IMAGE_BYTES }, queues: 4, ..Default::default() };
    let _srv = start(&s, options);
    let mut dev = open(&s.sock, BlkOptions { num_queues: 4, ..Default::default() });
    queues_on_threads(&mut dev, 4);
}
