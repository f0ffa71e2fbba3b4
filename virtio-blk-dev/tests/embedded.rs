//! Against the embedded vhost-user-blk server of `vblk` (RAM and image file), over both ring
//! formats: every scenario runs twice, as `split::NAME` and `packed::NAME`, against a server
//! that offers both (`ServerOptions::packed`); the driver's `BlkOptions::packed` picks the
//! format and each test checks which one was negotiated.

mod common;

use common::*;
use vblk::server::{Server, ServerOptions, Storage};
use virtio_blk_dev::{suite, BlkOptions};
use virtio_queue_core::{RingFeatures, RingFormat};

/// Starts a server that offers packed rings as well as split ones.
fn start(s: &Scratch, options: ServerOptions) -> vblk::server::ServerHandle {
    Server::start(&s.sock, ServerOptions { packed: true, ..options }).unwrap()
}

/// Opens the device with `options`, asking for `ring`, and checks that `ring` was negotiated.
fn open_ring(s: &Scratch, ring: Ring, options: BlkOptions) -> Dev {
    suite::open_ring(&|o| open(&s.sock, o), ring, options)
}

/// Every scenario below, once per ring format.
macro_rules! both_rings {
    ($($name:ident),* $(,)?) => {
        mod split {
            $(#[test] fn $name() { super::$name(super::Ring::Split) })*
        }
        mod packed {
            $(#[test] fn $name() { super::$name(super::Ring::Packed) })*
        }
    };
}

both_rings!(
    every_operation_on_ram,
    every_operation_on_an_image_file,
    without_indirect_and_event_idx,
    data_written_to_the_file_is_read_by_the_driver,
    read_only_export_refuses_writes_before_submission,
    two_queues_from_two_threads,
    four_queues_from_four_threads,
    asking_for_more_queues_than_offered_gets_the_offered_count,
    a_full_queue_is_reported_and_drains,
    many_laps_of_a_small_ring,
    server_shutdown_with_requests_in_flight,
);

fn every_operation_on_ram(ring: Ring) {
    let s = Scratch::new();
    let _srv = start(&s, ServerOptions { storage: Storage::Ram { size: IMAGE_BYTES }, ..Default::default() });
    let mut dev = open_ring(&s, ring, BlkOptions::default());
    assert_eq!(dev.capacity(), IMAGE_BYTES);
    assert_eq!(dev.block_size(), 512);
    every_operation(&mut dev, None);
}

fn every_operation_on_an_image_file(ring: Ring) {
    let s = Scratch::new();
    let _srv = start(&s, ServerOptions { storage: Storage::Image(s.image.clone()), ..Default::default() });
    let mut dev = open_ring(&s, ring, BlkOptions::default());
    every_operation(&mut dev, Some(&s.image));
}

fn without_indirect_and_event_idx(ring: Ring) {
    let s = Scratch::new();
    let _srv = start(&s, ServerOptions { storage: Storage::Image(s.image.clone()), ..Default::default() });
    let options = BlkOptions { indirect: false, event_idx: false, ..Default::default() };
    let mut dev = open_ring(&s, ring, options);
    assert_eq!(dev.ring_features() - RingFeatures::RING_PACKED, RingFeatures::empty());
    every_operation(&mut dev, Some(&s.image));
}

fn data_written_to_the_file_is_read_by_the_driver(ring: Ring) {
    let s = Scratch::new();
    let data = pattern(9, 4096);
    write_file(&s.image, 8192, &data);
    let _srv = start(&s, ServerOptions { storage: Storage::Image(s.image.clone()), ..Default::default() });
    let mut dev = open_ring(&s, ring, BlkOptions::default());
    let mut q = dev.take_queue(0).unwrap();
    assert_eq!(q.format(), ring.format());
    let mut back = vec![0u8; 4096];
    q.read_at(8192, &mut back).unwrap();
    assert_eq!(back, data);
}

fn read_only_export_refuses_writes_before_submission(ring: Ring) {
    let s = Scratch::new();
    let options = ServerOptions { storage: Storage::Image(s.image.clone()), read_only: true, ..Default::default() };
    let _srv = start(&s, options);
    let mut dev = open_ring(&s, ring, BlkOptions::default());
    read_only_refuses_writes(&mut dev);
}

/// Each queue on its own thread writes its own area of an image file, then the file itself
/// (not the driver) is compared with what was written.
fn queues_on_threads_with_file_check(ring: Ring, n: u16) {
    let s = Scratch::new();
    let options = ServerOptions { storage: Storage::Image(s.image.clone()), queues: n, ..Default::default() };
    let _srv = start(&s, options);
    let mut dev = open_ring(&s, ring, BlkOptions { num_queues: n, ..Default::default() });
    queues_on_threads(&mut dev, n, Some(&s.image));
}

fn two_queues_from_two_threads(ring: Ring) {
    queues_on_threads_with_file_check(ring, 2);
}

fn four_queues_from_four_threads(ring: Ring) {
    queues_on_threads_with_file_check(ring, 4);
}

fn asking_for_more_queues_than_offered_gets_the_offered_count(ring: Ring) {
    let s = Scratch::new();
    let options = ServerOptions { storage: Storage::Ram { size: IMAGE_BYTES }, queues: 2, ..Default::default() };
    let _srv = start(&s, options);
    let dev = open_ring(&s, ring, BlkOptions { num_queues: 8, ..Default::default() });
    assert_eq!(dev.num_queues(), 2);
}

fn a_full_queue_is_reported_and_drains(ring: Ring) {
    let s = Scratch::new();
    let _srv = start(&s, ServerOptions { storage: Storage::Ram { size: IMAGE_BYTES }, ..Default::default() });
    let mut dev = open_ring(&s, ring, BlkOptions { queue_size: 8, ..Default::default() });
    suite::a_full_queue_is_reported_and_drains(&mut dev);
}

fn many_laps_of_a_small_ring(ring: Ring) {
    let s = Scratch::new();
    let _srv = start(&s, ServerOptions { storage: Storage::Image(s.image.clone()), ..Default::default() });
    suite::many_laps_of_a_small_ring(&|o| open(&s.sock, o), ring, Some(&s.image));
}

fn server_shutdown_with_requests_in_flight(ring: Ring) {
    let s = Scratch::new();
    let srv = start(&s, ServerOptions { storage: Storage::Ram { size: IMAGE_BYTES }, ..Default::default() });
    let mut dev = open_ring(&s, ring, BlkOptions::default());
    in_flight_when_backend_dies(&mut dev, move || srv.shutdown());
}

/// A server that does not offer packed rings (the default) gets a driver that asks for them
/// onto split rings.
#[test]
fn packed_is_off_by_default_and_the_driver_falls_back_to_split() {
    let s = Scratch::new();
    let _srv =
        Server::start(&s.sock, ServerOptions { storage: Storage::Ram { size: IMAGE_BYTES }, ..Default::default() })
            .unwrap();
    let mut dev = open(&s.sock, BlkOptions { packed: true, ..Default::default() });
    assert!(!dev.ring_features().contains(RingFeatures::RING_PACKED));
    let mut q = dev.take_queue(0).unwrap();
    assert_eq!(q.format(), RingFormat::Split);
    q.write_at(0, &[7u8; 512]).unwrap();
}

/// One server, two connections in turn: the first on packed rings, the second on split rings.
#[test]
fn one_server_serves_both_formats_in_turn() {
    let s = Scratch::new();
    let _srv = start(&s, ServerOptions { storage: Storage::Image(s.image.clone()), ..Default::default() });
    let data = pattern(77, 8192);
    {
        let mut dev = open_ring(&s, Ring::Packed, BlkOptions::default());
        let mut q = dev.take_queue(0).unwrap();
        assert_eq!(q.format(), RingFormat::Packed);
        q.write_at(4096, &data).unwrap();
        q.flush().unwrap();
    }
    let mut dev = open_ring(&s, Ring::Split, BlkOptions::default());
    let mut q = dev.take_queue(0).unwrap();
    assert_eq!(q.format(), RingFormat::Split);
    let mut back = vec![0u8; data.len()];
    q.read_at(4096, &mut back).unwrap();
    assert!(back == data);
    assert!(read_file(&s.image, 4096, data.len()) == data);
}
