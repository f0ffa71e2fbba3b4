//! `vblk` itself on each device, as a user runs it: `info`, `verify` (a seeded pattern written,
//! flushed, read back and compared) and a short `bench` in both completion modes. The static
//! `vblk` is `/bin/vblk` in the guest (`cargo xtask vm-test` builds it).

use vm_tests::run_vblk;

/// `vblk info`, `verify` and `bench --poll` / `--interrupt` on `target` (`--pci ADDR` or
/// `--vdpa NODE`), which offers `queues` request queues.
pub fn info_verify_and_bench(target: &[&str], queues: u16) {
    let with = |args: &[&str]| -> Vec<String> { args.iter().chain(target).map(|s| s.to_string()).collect() };
    let run = |args: Vec<String>| run_vblk(&args.iter().map(String::as_str).collect::<Vec<_>>());

    let info = run(with(&["info"]));
    assert!(info.contains("capacity"), "vblk info says what the device is:\n{info}");
    // Both IOMMU transports negotiate it (Transport::transport_features), and info shows it.
    assert!(info.contains("ACCESS_PLATFORM"), "vblk info lists VIRTIO_F_ACCESS_PLATFORM:\n{info}");

    let verify = run(with(&["verify", "--length", "8M", "--offset", "1M", "--seed", "7"]));
    assert!(verify.contains("OK"), "vblk verify found the pattern intact:\n{verify}");
    // The pattern is on the device: a read-only pass over it finds it again.
    let again = run(with(&["verify", "--length", "8M", "--offset", "1M", "--seed", "7", "--no-write"]));
    assert!(again.contains("OK"), "vblk verify --no-write:\n{again}");

    // Within the first 16 MiB: the host-disk region of `pci::data_reaches_the_host_disk`
    // (48 MiB) must keep what that test wrote.
    let queues = queues.to_string();
    for mode in ["--poll", "--interrupt"] {
        let json = run(with(&[
            "bench",
            "--json",
            "--size",
            "16M",
            "--rw",
            "randrw",
            "--bs",
            "4K",
            "--iodepth",
            "8",
            "--runtime",
            "1",
            "--queues",
            &queues,
            mode,
        ]));
        let v: serde_json::Value =
            serde_json::from_str(&json).unwrap_or_else(|e| panic!("vblk bench --json printed no JSON ({e}):\n{json}"));
        let ctx = format!("vblk bench {mode}: {v}");
        assert_eq!(v["errors"], 0, "{ctx}");
        let (ios, reads, writes) = (v["ios"].as_u64(), v["read_ios"].as_u64(), v["write_ios"].as_u64());
        assert!(ios.is_some_and(|n| n > 0), "{ctx}");
        assert!(reads.is_some_and(|n| n > 0) && writes.is_some_and(|n| n > 0), "randrw did both: {ctx}");
        assert_eq!(v["queues"].as_u64(), Some(queues.parse().unwrap()), "{ctx}");
        assert_eq!(v["mode"], &mode[2..], "{ctx}");
        eprintln!("vblk bench {mode}: {:.0} IOPS, p50 {} ns", v["iops"].as_f64().unwrap_or(0.0), v["lat_ns"]["p50"]);
    }
}
