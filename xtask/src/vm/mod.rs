//! `cargo xtask vm-test`: the PCI (VFIO) and vhost-vdpa test tier, run inside a QEMU guest.
//!
//! Steps: host packages ([`assets::ensure_host_packages`]); guest kernel assets, cached per
//! kernel version ([`assets::ensure_kernel_assets`]); the static test binary of the `vm-tests`
//! crate; the initramfs ([`initramfs::build`]) with a generated `/init` ([`guest`]); one QEMU
//! boot per case ([`qemu::run`]); results parsed from the serial log. See `docs/vm-test.md`.

pub mod assets;
mod disk_check;
pub mod guest;
pub mod initramfs;
pub mod qemu;

use std::env;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use crate::{json_string_field, Cmd, Result};
use guest::{Case, CASES, DEFAULT_CASE};

/// Hard limit per boot, in seconds, unless `--timeout` says otherwise.
pub const DEFAULT_TIMEOUT: u64 = 300;

/// Limit per test inside the guest, in seconds (never more than the boot's own limit).
pub const TEST_TIMEOUT: u64 = 120;

/// Environment variable that moves the asset cache.
pub const CACHE_ENV: &str = "UVIRTIO_VM_CACHE";

/// The Rust target of the guest's test binary.
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Size of the raw disk behind the virtio-blk-pci device.
const DISK_BYTES: u64 = 64 << 20;
/// Boots per case when the guest kernel dies before `/init` (nothing was tested yet).
const BOOT_ATTEMPTS: u32 = 2;

/// The help text of `vm-test`.
pub const USAGE: &str = "\
usage: cargo xtask vm-test [--case NAME|all]... [--timeout SECS] [--kernel KVER]
                           [--refresh-kernel] [--assets-only]

  --case NAME       boot case to run (repeatable; default `devices`, `all` for every case)
  --timeout SECS    hard limit per boot (default 300)
  --kernel KVER     guest kernel release, e.g. 6.12.95+deb12-amd64 (default: newest cached,
                    else what bookworm-backports' linux-image-amd64 names)
  --refresh-kernel  ask bookworm-backports for the current kernel even if one is cached
  --assets-only     build assets, test binary and initramfs, but do not boot
cache: $UVIRTIO_VM_CACHE, default target/vm-assets";

/// Parsed `vm-test` arguments.
#[derive(Debug)]
pub struct Options {
    /// Cases to boot, in order.
    pub cases: Vec<&'static Case>,
    /// Hard limit per boot.
    pub timeout: u64,
    /// A pinned kernel release.
    pub kernel: Option<String>,
    /// Re-resolve the kernel from the archive.
    pub refresh_kernel: bool,
    /// Stop before booting.
    pub assets_only: bool,
}

/// Parses the arguments after `vm-test`.
pub fn parse_args(args: &[String]) -> Result<Options> {
    let mut opts = Options {
        cases: Vec::new(),
        timeout: DEFAULT_TIMEOUT,
        kernel: None,
        refresh_kernel: false,
        assets_only: false,
    };
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = |name: &str| {
            inline.clone().or_else(|| iter.next().cloned()).ok_or_else(|| format!("{name} needs a value\n{USAGE}"))
        };
        match flag {
            "--case" => {
                let name = value("--case")?;
                if name == "all" {
                    opts.cases.extend(CASES.iter());
                } else {
                    let case = CASES.iter().find(|c| c.name == name).ok_or_else(|| {
                        let names: Vec<&str> = CASES.iter().map(|c| c.name).collect();
                        format!("no case `{name}`; cases: {}, all", names.join(", "))
                    })?;
                    opts.cases.push(case);
                }
            }
            "--timeout" => opts.timeout = crate::parse_seconds(&value("--timeout")?)?,
            "--kernel" => opts.kernel = Some(value("--kernel")?),
            "--refresh-kernel" if inline.is_none() => opts.refresh_kernel = true,
            "--assets-only" if inline.is_none() => opts.assets_only = true,
            _ => return Err(format!("unexpected argument `{arg}`\n{USAGE}")),
        }
    }
    if opts.cases.is_empty() {
        opts.cases.extend(CASES.iter().filter(|c| c.name == DEFAULT_CASE));
    }
    Ok(opts)
}

/// Named durations, printed as a table at the end.
#[derive(Default)]
pub struct Timings(Vec<(String, f64)>);

/// Runs `step`, recording how long it took under `name`.
pub fn timed<T>(t: &mut Timings, name: &str, step: impl FnOnce() -> Result<T>) -> Result<T> {
    let start = Instant::now();
    let result = step();
    let seconds = start.elapsed().as_secs_f64();
    println!("[vm-test] {name}: {seconds:.1} s{}", if result.is_err() { " (failed)" } else { "" });
    let _ = std::io::stdout().flush();
    t.0.push((name.to_string(), seconds));
    result
}

/// Finds `program` on `PATH` or in the sbin directories (which a non-root `PATH` may lack).
pub fn find_program(program: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// The asset cache: `$UVIRTIO_VM_CACHE` or `<workspace>/target/vm-assets`.
fn cache_dir(root: &Path) -> PathBuf {
    match env::var_os(CACHE_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => root.join("target").join("vm-assets"),
    }
}

/// Builds the `vm-tests` crate's `guest` test binary, statically linked, and returns its path.
///
/// It has its own target directory, so the `+crt-static` flags do not invalidate the normal
/// build cache.
fn build_test_binary(root: &Path) -> Result<PathBuf> {
    let target_dir = root.join("target").join("vm-tests");
    let cmd = Cmd::cargo([
        "test",
        "-p",
        "vm-tests",
        "--test",
        "guest",
        "--release",
        "--no-run",
        "--target",
        GUEST_TARGET,
        "--message-format=json-render-diagnostics",
    ])
    .env("RUSTFLAGS", "-C target-feature=+crt-static")
    .env("CARGO_TARGET_DIR", &target_dir.display().to_string());
    println!("$ {}", cmd.display());
    let out = Command::new(&cmd.program)
        .args(&cmd.args)
        .envs(cmd.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(root)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot start cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building the static test binary failed ({}); a missing libc.a means package libc6-dev, \
             a missing target means `rustup target add {GUEST_TARGET}`",
            out.status
        ));
    }
    test_executable(&String::from_utf8_lossy(&out.stdout))
        .ok_or_else(|| "cargo reported no test executable for vm-tests --test guest".to_string())
}

/// Builds `vblk`, statically linked, for the guest tests that run it (`/bin/vblk` there), in
/// the test binary's target directory (same flags, so the dependencies are built once).
fn build_vblk_binary(root: &Path) -> Result<PathBuf> {
    let target_dir = root.join("target").join("vm-tests");
    let cmd = Cmd::cargo(["build", "-p", "vblk", "--bin", "vblk", "--release", "--target", GUEST_TARGET])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env("CARGO_TARGET_DIR", &target_dir.display().to_string());
    println!("$ {}", cmd.display());
    let status = Command::new(&cmd.program)
        .args(&cmd.args)
        .envs(cmd.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(root)
        .status()
        .map_err(|e| format!("cannot start cargo: {e}"))?;
    if !status.success() {
        return Err(format!("building the static vblk failed ({status})"));
    }
    Ok(target_dir.join(GUEST_TARGET).join("release").join("vblk"))
}

/// The `executable` of the last test artifact in cargo's JSON messages.
pub fn test_executable(messages: &str) -> Option<PathBuf> {
    messages
        .lines()
        .filter(|l| l.contains("\"reason\":\"compiler-artifact\"") && l.contains("\"test\":true"))
        .filter_map(|l| json_string_field(l, "executable"))
        .next_back()
        .map(PathBuf::from)
}

/// `cargo xtask vm-test ...`.
pub fn vm_test(root: &Path, args: &[String]) -> Result<ExitCode> {
    let opts = parse_args(args)?;
    let cache = cache_dir(root);
    let work = root.join("target").join("vm-test");
    assets::mkdir(&cache)?;
    assets::mkdir(&work)?;
    let mut t = Timings::default();
    let total = Instant::now();

    timed(&mut t, "host packages", assets::ensure_host_packages)?;
    let kver = assets::resolve_kernel(&cache, opts.kernel.as_deref(), opts.refresh_kernel, &mut t)?;
    let kernel = assets::ensure_kernel_assets(&cache, &kver, &mut t)?;
    let test_binary = timed(&mut t, "static test binary", || build_test_binary(root))?;
    let vblk_binary = timed(&mut t, "static vblk", || build_vblk_binary(root))?;
    let initrd = work.join("initramfs.cpio");
    timed(&mut t, "initramfs", || {
        let order = initramfs::module_order(&kernel)?;
        let names: Vec<String> = order.iter().map(|p| initramfs::module_name(p)).collect();
        let boot: Vec<String> = names.iter().filter(|n| !initramfs::is_sim_module(n)).cloned().collect();
        let sims: Vec<String> = names.iter().filter(|n| initramfs::is_sim_module(n)).cloned().collect();
        let init = guest::init_script(&boot, &sims);
        fs::write(work.join("init.sh"), &init).map_err(|e| format!("cannot write init.sh: {e}"))?;
        let contents =
            initramfs::Contents { assets: &kernel, test_binary: &test_binary, vblk_binary: &vblk_binary, init: &init };
        initramfs::build(&contents, &initrd)
    })?;
    if opts.assets_only {
        print_timings(&t, total.elapsed().as_secs_f64());
        return Ok(ExitCode::SUCCESS);
    }

    let qemu = find_program("qemu-system-x86_64").ok_or("qemu-system-x86_64 not found (package qemu-system-x86)")?;
    let mut failed_cases = Vec::new();
    let mut summaries = Vec::new();
    for case in &opts.cases {
        println!("\n==> vm-test case {}: {}", case.name, case.about);
        let disk = work.join(format!("{}.disk.img", case.name));
        let serial_log = work.join(format!("{}.serial.log", case.name));
        // A guest kernel that dies before `/init` runs (seen once under TCG: an int3 oops in
        // sched_clock_cpu at 3.5 s) has tested nothing: that boot, and only that, is retried.
        let mut attempt = 1;
        let (outcome, report) = loop {
            let file = fs::File::create(&disk).map_err(|e| format!("cannot create {}: {e}", disk.display()))?;
            file.set_len(DISK_BYTES).map_err(|e| format!("cannot size {}: {e}", disk.display()))?;
            drop(file);
            let boot = qemu::Boot {
                case,
                kernel: &kernel.vmlinuz(),
                initrd: &initrd,
                disk: &disk,
                serial_log: &serial_log,
                test_timeout: TEST_TIMEOUT.min(opts.timeout),
            };
            let outcome = timed(&mut t, &format!("boot {} (QEMU wall)", case.name), || {
                qemu::run(&qemu, &boot, Duration::from_secs(opts.timeout))
            })?;
            let log = fs::read(&serial_log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
            let report = qemu::parse_serial(&log);
            if report.booted.is_some() || attempt == BOOT_ATTEMPTS {
                break (outcome, report);
            }
            let tail: Vec<&str> = log.lines().rev().take(12).collect();
            println!(
                "case {}: the guest never reached /init (attempt {attempt} of {BOOT_ATTEMPTS}); last serial lines:\n{}\nbooting again",
                case.name,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
            attempt += 1;
        };
        let exited_ok = outcome.exit.is_some_and(|s| s.success());
        let mut problems = qemu::verdict(case, &report, exited_ok);
        // What the PCI tier wrote must be in the disk image itself.
        let runs_pci = case.phases.iter().any(|p| p.prefixes.iter().any(|x| disk_check::TEST_NAME.starts_with(x)));
        match report.tests.iter().find(|t| t.name == disk_check::TEST_NAME) {
            Some(t) if t.verdict == "PASS" => problems.extend(disk_check::check(&disk).err()),
            Some(_) => {} // its failure is already a problem
            None if runs_pci => problems.push(format!("{} did not run", disk_check::TEST_NAME)),
            None => {}
        }
        if std::env::var_os("UVIRTIO_VM_KEEP_DISK").is_none() {
            let _ = fs::remove_file(&disk);
        }
        if outcome.exit.is_none() {
            problems.insert(0, format!("timed out after {} s (--timeout)", opts.timeout));
        }
        if !outcome.stderr.trim().is_empty() {
            println!("QEMU stderr:\n{}", outcome.stderr.trim_end());
        }
        println!("\ncase {}: serial log {}", case.name, serial_log.display());
        println!("{:<6}  {:<22}  {:<58}  {:>8}", "result", "phase", "test", "ms");
        for test in &report.tests {
            println!("{:<6}  {:<22}  {:<58}  {:>8}", test.verdict, test.phase, test.name, test.millis);
        }
        let boot_line = format!(
            "case {}: /init at {} s guest uptime, done at {} s, QEMU wall {:.1} s",
            case.name,
            report.booted.map_or("-".into(), |s| format!("{s:.2}")),
            report.done.map_or("-".into(), |s| format!("{s:.2}")),
            outcome.wall
        );
        println!("{boot_line}");
        if problems.is_empty() {
            println!("case {}: PASS ({} tests)", case.name, report.tests.len());
            summaries.push(format!("{}: PASS, {} tests; {boot_line}", case.name, report.tests.len()));
        } else {
            println!("case {}: FAIL", case.name);
            for p in &problems {
                println!("  - {p}");
            }
            summaries.push(format!("{}: FAIL ({})", case.name, problems.join("; ")));
            failed_cases.push(case.name);
        }
    }
    print_timings(&t, total.elapsed().as_secs_f64());
    println!();
    for s in &summaries {
        println!("{s}");
    }
    if failed_cases.is_empty() {
        println!("vm-test: all {} case(s) passed", opts.cases.len());
        Ok(ExitCode::SUCCESS)
    } else {
        println!("vm-test: FAILED: {}", failed_cases.join(", "));
        Ok(ExitCode::FAILURE)
    }
}

/// Prints the step timings.
fn print_timings(t: &Timings, total: f64) {
    println!("\n{:<45}  {:>8}", "step", "seconds");
    for (name, seconds) in &t.0 {
        println!("{name:<45}  {seconds:>8.1}");
    }
    println!("{:<45}  {total:>8.1}", "total");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn arguments() {
        let opts = parse_args(&[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(opts.cases.iter().map(|c| c.name).collect::<Vec<_>>(), [DEFAULT_CASE]);
        assert_eq!(opts.timeout, DEFAULT_TIMEOUT);
        let opts =
            parse_args(&strings(&["--case", "all", "--timeout=60", "--kernel", "6.12.9-amd64", "--assets-only"]))
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(opts.cases.len(), CASES.len());
        assert_eq!(opts.timeout, 60);
        assert_eq!(opts.kernel.as_deref(), Some("6.12.9-amd64"));
        assert!(opts.assets_only && !opts.refresh_kernel);
        let negative = parse_args(&strings(&["--case=no-access-platform"])).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(negative.cases.iter().map(|c| c.name).collect::<Vec<_>>(), ["no-access-platform"]);
        assert!(parse_args(&strings(&["--case", "nope"])).is_err());
        assert!(parse_args(&strings(&["--timeout"])).is_err());
        assert!(parse_args(&strings(&["--timeout", "0"])).is_err());
        assert!(parse_args(&strings(&["--assets-only=1"])).is_err());
        assert!(parse_args(&strings(&["extra"])).is_err());
    }

    #[test]
    fn finds_test_executable() {
        let messages = "\
{\"reason\":\"compiler-artifact\",\"target\":{\"kind\":[\"lib\"],\"test\":true},\"profile\":{\"test\":false},\"executable\":null}\n\
{\"reason\":\"compiler-artifact\",\"target\":{\"kind\":[\"test\"],\"name\":\"guest\",\"test\":true},\"profile\":{\"test\":true},\"executable\":\"/t/vm-tests/x86_64-unknown-linux-gnu/release/deps/guest-abc\"}\n\
{\"reason\":\"build-finished\",\"success\":true}\n";
        assert_eq!(
            test_executable(messages),
            Some(PathBuf::from("/t/vm-tests/x86_64-unknown-linux-gnu/release/deps/guest-abc"))
        );
        assert_eq!(test_executable("{\"reason\":\"build-finished\"}\n"), None);
    }
}
