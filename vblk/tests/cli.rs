//! The `vblk` binary end to end: against the embedded server it starts in its own process (no
//! target option) and against `vblk serve` running in a child process (`--vhost-user`).

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const VBLK: &str = env!("CARGO_BIN_EXE_vblk");

/// Taken by the tests whose driver or embedded server spins (polling, hybrid waiting, the
/// server's poll window), so that no two of them share the machine's cores: the hybrid
/// waiting case counts on its spin getting a core while the server answers.
static SPINNERS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Takes [`SPINNERS`] (a test that failed while holding it does not poison the others).
fn spinners() -> std::sync::MutexGuard<'static, ()> {
    SPINNERS.lock().unwrap_or_else(|p| p.into_inner())
}
const IMAGE_BYTES: u64 = 16 << 20;

fn vblk(args: &[&str]) -> Output {
    Command::new(VBLK).args(args).stdin(Stdio::null()).output().expect("run vblk")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asserts success and returns stdout.
fn ok(args: &[&str]) -> String {
    let o = vblk(args);
    assert!(o.status.success(), "vblk {args:?} failed: {}", stderr(&o));
    stdout(&o)
}

/// Asserts a failure with exactly one line on stderr, starting with `vblk:`; returns it.
fn fails_with_one_line(args: &[&str]) -> String {
    let o = vblk(args);
    let err = stderr(&o);
    assert!(!o.status.success(), "vblk {args:?} succeeded: {}", stdout(&o));
    assert_eq!(err.lines().count(), 1, "vblk {args:?} stderr: {err:?}");
    assert!(err.starts_with("vblk: "), "vblk {args:?} stderr: {err:?}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn json(s: &str) -> serde_json::Value {
    assert_eq!(s.trim().lines().count(), 1, "one JSON line expected: {s}");
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

struct Scratch {
    dir: tempfile::TempDir,
    image: PathBuf,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        fs::File::create(&image).unwrap().set_len(IMAGE_BYTES).unwrap();
        Scratch { dir, image }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn image_arg(&self) -> &str {
        self.image.to_str().unwrap()
    }
}

/// `vblk serve` in a child process, killed when dropped.
struct Serve {
    child: Child,
    socket: PathBuf,
}

impl Serve {
    fn start(s: &Scratch, extra: &[&str]) -> Serve {
        let socket = s.path("serve.sock");
        let mut child = Command::new(VBLK)
            .args(["serve", "--socket", socket.to_str().unwrap()])
            .args(extra)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start vblk serve");
        // `vblk serve` prints "serving ..." once it listens (the socket file
        // alone appears between bind and listen). Keep draining stderr so the
        // server never blocks on a full pipe.
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("serving") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(10)).expect("vblk serve did not report listening within 10 s");
        Serve { child, socket }
    }

    fn sock(&self) -> &str {
        self.socket.to_str().unwrap()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8).collect()
}

fn read_file_at(p: &Path, offset: u64, len: usize) -> Vec<u8> {
    let all = fs::read(p).unwrap();
    all[offset as usize..offset as usize + len].to_vec()
}

#[test]
fn info_on_the_embedded_server() {
    let text = ok(&["info", "--size", "64M"]);
    assert!(text.contains("capacity:     67108864 bytes (64 MiB)"), "{text}");
    assert!(text.contains("ring format:  split"), "{text}");
    assert!(text.contains("device id:    uvirtio-vblk"), "{text}");
    assert!(text.contains("VERSION_1"), "{text}");

    let v = json(&ok(&["info", "--size", "64M", "--queues", "2", "--json", "--no-event-idx"]));
    assert_eq!(v["capacity_bytes"], 64 << 20);
    assert_eq!(v["block_size"], 512);
    assert_eq!(v["queues"], 2);
    assert_eq!(v["read_only"], false);
    assert_eq!(v["ring_format"], "split");
    assert_eq!(v["device_id"], "uvirtio-vblk");
    let features: Vec<&str> = v["features"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
    assert!(features.contains(&"FLUSH") && features.contains(&"MQ"), "{features:?}");
    assert!(!features.contains(&"EVENT_IDX"), "--no-event-idx: {features:?}");
}

#[test]
fn info_over_vhost_user() {
    let s = Scratch::new();
    let srv = Serve::start(&s, &["--image", s.image_arg(), "--queues", "2", "--serial", "from-serve"]);
    let v = json(&ok(&["info", "--vhost-user", srv.sock(), "--queues", "2", "--json"]));
    assert_eq!(v["capacity_bytes"], IMAGE_BYTES);
    assert_eq!((&v["queues"], &v["queues_offered"]), (&2.into(), &2.into()));
    // Without --queues one is set up; the device still offers two.
    let v = json(&ok(&["info", "--vhost-user", srv.sock(), "--json"]));
    assert_eq!((&v["queues"], &v["queues_offered"]), (&1.into(), &2.into()));
    let text = ok(&["info", "--vhost-user", srv.sock()]);
    assert!(text.contains("queues:       1 set up, 2 offered"), "{text}");
    assert_eq!(v["device_id"], "from-serve");
    assert_eq!(v["target"], format!("vhost-user:{}", srv.sock()));
}

/// `write` then `read` round trip, and the bytes checked in the image file itself.
fn round_trip(s: &Scratch, target: &[&str]) {
    let data = pattern(5, 3 * 4096);
    let input = s.path("in.bin");
    let output = s.path("out.bin");
    fs::write(&input, &data).unwrap();
    let mut args = vec!["write", "--offset", "1M", "--input", input.to_str().unwrap()];
    args.extend(target);
    ok(&args);
    let mut args = vec!["read", "--offset", "1M", "--length", "12K", "--output", output.to_str().unwrap()];
    args.extend(target);
    ok(&args);
    assert_eq!(fs::read(&output).unwrap(), data, "read back through the driver");
    assert_eq!(read_file_at(&s.image, 1 << 20, data.len()), data, "in the image file");
}

#[test]
fn write_read_round_trip_on_the_embedded_server() {
    let s = Scratch::new();
    round_trip(&s, &["--image", s.image_arg()]);
}

#[test]
fn write_read_round_trip_over_vhost_user() {
    let s = Scratch::new();
    let srv = Serve::start(&s, &["--image", s.image_arg()]);
    round_trip(&s, &["--vhost-user", srv.sock()]);
}

#[test]
fn verify_passes_and_detects_a_corrupted_image() {
    let s = Scratch::new();
    let img = s.image_arg();
    let out = ok(&["verify", "--image", img, "--offset", "64K", "--length", "1M", "--seed", "3", "--bs", "16K"]);
    assert!(out.contains("OK"), "{out}");
    // The same pattern is still there: a read-only check passes.
    ok(&["verify", "--image", img, "--offset", "64K", "--length", "1M", "--seed", "3", "--no-write"]);
    // Another seed is another pattern.
    let err = fails_with_one_line(&[
        "verify",
        "--image",
        img,
        "--offset",
        "64K",
        "--length",
        "1M",
        "--seed",
        "4",
        "--no-write",
    ]);
    // The first sector differs first in its seed field, at byte 8.
    assert!(err.contains("mismatch at byte 65544"), "{err}");

    // Corrupt one byte in the file behind the server's back, then check again.
    let at = 64 * 1024 + 300_000u64;
    let mut bytes = fs::read(&s.image).unwrap();
    bytes[at as usize] ^= 0x40;
    fs::write(&s.image, &bytes).unwrap();
    let err = fails_with_one_line(&[
        "verify",
        "--image",
        img,
        "--offset",
        "64K",
        "--length",
        "1M",
        "--seed",
        "3",
        "--no-write",
    ]);
    assert!(err.contains(&format!("mismatch at byte {at}")), "{err}");
    assert!(err.contains("1 of 16 I/Os differ"), "{err}");
}

#[test]
fn verify_over_vhost_user_with_a_tail_shorter_than_bs() {
    let s = Scratch::new();
    let srv = Serve::start(&s, &["--image", s.image_arg()]);
    let out = ok(&["verify", "--vhost-user", srv.sock(), "--length", "1000K", "--bs", "64K", "--iodepth", "4"]);
    assert!(out.contains("OK"), "{out}");
    // The pattern is in the file: sector 3 starts with its own offset.
    assert_eq!(read_file_at(&s.image, 1536, 8), 1536u64.to_le_bytes());
}

fn bench(target: &[&str], rw: &str, mode: &str) -> serde_json::Value {
    let mut args = vec!["bench", "--json", "--runtime", "0.5", "--rw", rw, mode, "--queues", "2", "--iodepth", "4"];
    args.extend(target);
    let v = json(&ok(&args));
    let ctx = format!("{rw} {mode}: {v}");
    assert!(v["ios"].as_u64().unwrap() > 0, "{ctx}");
    assert_eq!(v["errors"], 0, "{ctx}");
    assert_eq!(v["queues"], 2, "{ctx}");
    assert_eq!(v["iodepth"], 4, "{ctx}");
    assert_eq!(v["bs"], 4096, "{ctx}");
    assert_eq!(v["rw"], rw, "{ctx}");
    assert_eq!(v["mode"], &mode[2..], "{ctx}");
    let (ios, r, w) = (v["ios"].as_u64().unwrap(), v["read_ios"].as_u64().unwrap(), v["write_ios"].as_u64().unwrap());
    assert_eq!(ios, r + w, "{ctx}");
    match rw {
        "read" | "randread" => assert_eq!(w, 0, "{ctx}"),
        "write" | "randwrite" => assert_eq!(r, 0, "{ctx}"),
        _ => assert!(r > 0 && w > 0, "{ctx}"),
    }
    let runtime = v["runtime_s"].as_f64().unwrap();
    assert!((0.4..5.0).contains(&runtime), "{ctx}");
    assert!(v["iops"].as_f64().unwrap() > 0.0, "{ctx}");
    assert!(v["bw_bytes_per_s"].as_f64().unwrap() > 0.0, "{ctx}");
    assert!(v["cpu_ns_per_io"].as_f64().unwrap() > 0.0, "{ctx}");
    let lat = &v["lat_ns"];
    let (p50, p99, p999) = (lat["p50"].as_u64().unwrap(), lat["p99"].as_u64().unwrap(), lat["p99_9"].as_u64().unwrap());
    assert!(p50 > 0 && p50 <= p99 && p99 <= p999, "{ctx}");
    assert!(lat["mean"].as_f64().unwrap() > 0.0, "{ctx}");
    assert!(v["target"].is_string(), "{ctx}");
    assert_eq!(v["batch_completions"], mode == "--interrupt", "{ctx}");
    assert_eq!(v["poll_pacing"], mode == "--poll", "{ctx}");
    assert_eq!(v["spin_us"], serde_json::Value::Null, "{ctx}");
    assert!(v["kicks"].is_u64() && v["waits"].is_u64(), "{ctx}");
    if mode == "--poll" {
        assert_eq!(v["waits"], 0, "{ctx}");
    }
    v
}

const RW: [&str; 5] = ["read", "write", "randread", "randwrite", "randrw"];

#[test]
fn bench_every_pattern_polling() {
    let _cores = spinners();
    for rw in RW {
        bench(&["--size", "64M"], rw, "--poll");
    }
}

#[test]
fn bench_every_pattern_with_interrupts() {
    let _cores = spinners();
    for rw in RW {
        bench(&["--size", "64M"], rw, "--interrupt");
    }
}

#[test]
fn bench_over_vhost_user() {
    let _cores = spinners();
    let s = Scratch::new();
    // A server that sleeps when its queue is empty (no poll window): the hybrid-waiting case
    // below spins against it, and on two cores shared with other tests a server spinning
    // too would keep taking the CPU the driver's spin waits for.
    let srv = Serve::start(&s, &["--size", "64M", "--queues", "2", "--poll-us", "0"]);
    let v = bench(&["--vhost-user", srv.sock()], "randrw", "--interrupt");
    assert_eq!(v["target"], format!("vhost-user:{}", srv.sock()));
    bench(&["--vhost-user", srv.sock()], "read", "--poll");
    // A short run over the server with `extra` options.
    let run = |extra: &[&str]| {
        let mut args = vec!["bench", "--json", "--runtime", "0.3"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--vhost-user", srv.sock()]);
        json(&ok(&args))
    };
    let v = run(&["--interrupt", "--no-batch-completions", "--iodepth", "8"]);
    assert_eq!(v["batch_completions"], false, "{v}");
    assert!(v["ios"].as_u64().unwrap() > 0 && v["errors"] == 0, "{v}");
    let v = run(&["--no-pacing", "--iodepth", "8"]);
    assert_eq!((&v["mode"], &v["poll_pacing"]), (&"poll".into(), &false.into()), "{v}");
    assert!(v["ios"].as_u64().unwrap() > 0 && v["errors"] == 0, "{v}");
    // Hybrid waiting at depth 1: a 1 ms spin catches most completions of the
    // server (without it every request sleeps once), even on a busy machine.
    let v = run(&["--interrupt", "--spin-us", "1000", "--iodepth", "1"]);
    assert_eq!((&v["mode"], &v["spin_us"]), (&"interrupt".into(), &1000.into()), "{v}");
    let ios = v["ios"].as_u64().unwrap();
    assert!(ios > 0 && v["errors"] == 0, "{v}");
    assert!(v["waits"].as_u64().unwrap() * 2 < ios, "most completions were found by the spin: {v}");
}

/// The embedded server's poll window, from the command line: a driver that submits again
/// within it is spared its kick; with no window the server sleeps and needs kicks.
#[test]
fn server_polling_spares_the_kicks() {
    let _cores = spinners();
    let run = |extra: &[&str]| {
        let mut args = vec!["bench", "--json", "--runtime", "0.3", "--size", "64M", "--iodepth", "1"];
        args.extend_from_slice(extra);
        let v = json(&ok(&args));
        let (ios, kicks) = (v["ios"].as_u64().unwrap(), v["kicks"].as_u64().unwrap());
        assert!(ios > 0 && v["errors"] == 0, "{v}");
        (ios, kicks, v)
    };
    // Lenient bounds: tests share two cores, and a driver descheduled for longer than the
    // window kicks.
    let (ios, kicks, v) = run(&[]);
    assert!(kicks * 2 < ios, "polling server, default window: {v}");
    let (ios, kicks, v) = run(&["--interrupt"]);
    assert!(kicks * 2 < ios, "polling server, interrupt mode: {v}");
    // Without a window the server still finds requests published while it serves (a debug
    // build serves slowly), so the bound is only "it kicks": tests/server.rs times it exactly.
    let (_, kicks, v) = run(&["--server-poll-us", "0"]);
    assert!(kicks > 0, "a server that sleeps at once: {v}");

    let s = Scratch::new();
    let srv = Serve::start(&s, &["--size", "64M", "--poll-us", "0"]);
    let (_, kicks, v) = run(&["--vhost-user", srv.sock()]);
    assert!(kicks > 0, "vblk serve --poll-us 0: {v}");
}

#[test]
fn bad_arguments_and_targets_get_one_line() {
    let s = Scratch::new();
    let missing = s.path("missing.sock");
    let missing = missing.to_str().unwrap();
    let out = s.path("out.bin");
    let out = out.to_str().unwrap();
    let cases: &[&[&str]] = &[
        &["bench", "--bs", "1000"],
        &["bench", "--bs", "4Q"],
        &["bench", "--runtime", "0"],
        &["bench", "--interrupt", "--no-pacing"],
        &["bench", "--spin-us", "10"],
        &["bench", "--interrupt", "--spin-us", "0"],
        &["bench", "--interrupt", "--spin-us", "1001"],
        &["bench", "--server-poll-us", "10001"],
        &["bench", "--server-poll-us", "-1"],
        &["bench", "--vhost-user", missing, "--server-poll-us", "10"],
        &["serve", "--socket", missing, "--poll-us", "10001"],
        &["bench", "--rw", "sideways"],
        &["bench", "--size", "64M", "--offset", "100"],
        &["bench", "--offset", "2G"],
        &["bench", "--vhost-user", missing],
        &["bench", "--vdpa", "/dev/vhost-vdpa-0"],
        &["bench", "--pci", "0000:00:04.0"],
        &["info", "--vhost-user", missing, "--image", "x.img"],
        &["info", "--vhost-user", missing],
        &["read", "--size", "1M", "--offset", "513", "--length", "512", "--output", out],
        &["read", "--size", "1M", "--offset", "1M", "--length", "512", "--output", out],
        &["read", "--size", "1M", "--length", "100", "--output", out],
        &["write", "--size", "1M", "--input", missing],
        &["verify", "--size", "1M", "--length", "2M"],
        &["verify", "--size", "1M", "--offset", "100"],
        &["nonsense"],
    ];
    for args in cases {
        fails_with_one_line(args);
    }
    let e = fails_with_one_line(&["read", "--size", "1M", "--offset", "513", "--length", "512", "--output", out]);
    assert!(e.contains("not a multiple"), "{e}");
    let e = fails_with_one_line(&["info", "--vhost-user", missing]);
    assert!(e.contains("No such file"), "{e}");
    let e = fails_with_one_line(&["bench", "--vhost-user", missing, "--server-poll-us", "10"]);
    assert!(e.contains("cannot be used with"), "the embedded server's option with a target: {e}");
}

#[test]
fn bench_and_verify_on_packed_rings() {
    let _cores = spinners();
    // For bench, --size is the I/O range; the embedded RAM disk keeps its 1 GiB default.
    let v = bench(&["--size", "64M", "--packed"], "randrw", "--interrupt");
    assert_eq!(v["target"], "embedded-ram:1GiB");
    bench(&["--size", "64M", "--packed"], "write", "--poll");
    let out = ok(&["verify", "--size", "64M", "--packed", "--length", "4M", "--iodepth", "16"]);
    assert!(out.contains("OK"), "{out}");
}
