//! Command-line syntax: every command, its options and the value parsers.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use vblk::server::{DEFAULT_POLL, DEFAULT_QUEUE_SIZE, DEFAULT_RAM_SIZE, MAX_QUEUES};

/// Largest poll window of the embedded server's workers, in µs (`--poll-us`).
const MAX_POLL_US: u64 = 10_000;

/// Drive virtio-blk devices from user space.
#[derive(Parser, Debug)]
#[command(name = "vblk", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Show the device: capacity, block size, features, queues, ring format, id.
    Info(InfoArgs),
    /// Read bytes from the device into a file.
    Read(ReadArgs),
    /// Write a file to the device.
    Write(WriteArgs),
    /// Write a seeded pattern, flush, read it back and compare (exit 1 on mismatch).
    Verify(VerifyArgs),
    /// Measure IOPS, bandwidth, latency and driver CPU time per I/O (fio-like).
    Bench(BenchArgs),
    /// Run the embedded vhost-user-blk server alone, for other front-ends, until killed.
    Serve(ServeArgs),
}

/// Which device to drive, and how to negotiate with it. With no target option, an embedded
/// vhost-user-blk server is started in this process on a temporary unix socket.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Target")]
pub struct TargetArgs {
    /// Connect to a vhost-user-blk back-end listening on this unix socket.
    #[arg(long, value_name = "PATH", group = "target")]
    pub vhost_user: Option<PathBuf>,
    /// A vhost-vdpa device, e.g. /dev/vhost-vdpa-0 (its memory is memfd-backed and mapped
    /// through the vhost IOTLB).
    #[arg(long, value_name = "DEV", group = "target")]
    pub vdpa: Option<PathBuf>,
    /// A modern virtio-blk PCI function bound to vfio-pci, by address (0000:00:04.0) or sysfs
    /// path; it must offer VIRTIO_F_ACCESS_PLATFORM.
    #[arg(long, value_name = "ADDR", group = "target")]
    pub pci: Option<String>,
    /// Embedded server: serve this image file (its size is the capacity) instead of RAM.
    #[arg(long, value_name = "FILE", conflicts_with = "target")]
    pub image: Option<PathBuf>,
    /// Embedded server: microseconds its workers keep polling after the last request before
    /// they sleep until a kick (as `vblk serve --poll-us`; 0: sleep at once).
    #[arg(long, value_name = "US", default_value_t = DEFAULT_POLL.as_micros() as u64,
          value_parser = clap::value_parser!(u64).range(0..=MAX_POLL_US), conflicts_with = "target")]
    pub server_poll_us: u64,
    /// Request queues to set up (the embedded server offers this many).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_QUEUES)))]
    pub queues: u16,
    /// Largest queue size to negotiate (a power of two; default 256, raised to fit --iodepth).
    #[arg(long, value_name = "N", value_parser = parse_queue_size)]
    pub queue_size: Option<u16>,
    /// Require packed rings (fail if the device does not offer VIRTIO_F_RING_PACKED).
    #[arg(long, conflicts_with = "split")]
    pub packed: bool,
    /// Use split rings even if packed rings are offered.
    #[arg(long)]
    pub split: bool,
    /// Do not negotiate VIRTIO_F_EVENT_IDX.
    #[arg(long)]
    pub no_event_idx: bool,
    /// Do not negotiate VIRTIO_F_INDIRECT_DESC.
    #[arg(long)]
    pub no_indirect: bool,
    /// Do not negotiate VIRTIO_F_IN_ORDER.
    #[arg(long)]
    pub no_in_order: bool,
}

/// `--size` of the embedded server's RAM disk, for the commands where `--size` means that.
#[derive(Args, Debug, Clone)]
pub struct RamSizeArg {
    /// Embedded server: size of the RAM disk, e.g. 64M, 1G (default 1G).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, conflicts_with_all = ["target", "image"])]
    pub size: Option<u64>,
}

impl RamSizeArg {
    /// The RAM disk size asked for, or the default.
    pub fn bytes(&self) -> u64 {
        self.size.unwrap_or(DEFAULT_RAM_SIZE)
    }
}

#[derive(Args, Debug)]
pub struct InfoArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub ram: RamSizeArg,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ReadArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub ram: RamSizeArg,
    /// Byte offset on the device (a multiple of the block size; K/M/G suffixes).
    #[arg(long, value_name = "N", value_parser = parse_offset, default_value = "0")]
    pub offset: u64,
    /// Bytes to read (a multiple of the block size; K/M/G suffixes).
    #[arg(long, value_name = "N", value_parser = parse_size)]
    pub length: u64,
    /// File to write the data to ("-": standard output).
    #[arg(long, value_name = "FILE")]
    pub output: PathBuf,
}

#[derive(Args, Debug)]
pub struct WriteArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub ram: RamSizeArg,
    /// Byte offset on the device (a multiple of the block size; K/M/G suffixes).
    #[arg(long, value_name = "N", value_parser = parse_offset, default_value = "0")]
    pub offset: u64,
    /// File to write to the device ("-": standard input); its length must be a multiple of
    /// the block size. Read into memory first.
    #[arg(long, value_name = "FILE")]
    pub input: PathBuf,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub ram: RamSizeArg,
    /// Byte offset of the range (a multiple of the block size).
    #[arg(long, value_name = "N", value_parser = parse_offset, default_value = "0")]
    pub offset: u64,
    /// Bytes in the range (default: to the end of the device).
    #[arg(long, value_name = "N", value_parser = parse_size)]
    pub length: Option<u64>,
    /// Seed of the pattern; each 512-byte sector holds its own offset and the seed.
    #[arg(long, value_name = "S", default_value_t = 1)]
    pub seed: u64,
    /// Size of each I/O [default: 64K, or the device's largest segment (size_max) if smaller].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub bs: Option<u64>,
    /// I/Os in flight.
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub iodepth: u16,
    /// Skip the write phase: check a pattern written earlier with the same seed and range.
    #[arg(long, conflicts_with = "no_read")]
    pub no_write: bool,
    /// Only write (and flush) the pattern, for a later `verify --no-write`.
    #[arg(long)]
    pub no_read: bool,
}

/// The I/O pattern of `bench`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rw {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Random reads and writes, --rwmixread percent reads.
    Randrw,
}

impl Rw {
    /// The name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Rw::Read => "read",
            Rw::Write => "write",
            Rw::Randread => "randread",
            Rw::Randwrite => "randwrite",
            Rw::Randrw => "randrw",
        }
    }

    /// Whether offsets are random.
    pub fn random(self) -> bool {
        matches!(self, Rw::Randread | Rw::Randwrite | Rw::Randrw)
    }

    /// Whether any request writes.
    pub fn writes(self) -> bool {
        !matches!(self, Rw::Read | Rw::Randread)
    }
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// I/O pattern.
    #[arg(long, value_enum, default_value = "randread")]
    pub rw: Rw,
    /// Percentage of reads for randrw.
    #[arg(long, value_name = "PCT", default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub rwmixread: u8,
    /// Size of each I/O.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "4K")]
    pub bs: u64,
    /// I/Os in flight per queue.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=32768))]
    pub iodepth: u16,
    /// Seconds to run (fractions allowed).
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0, value_parser = parse_runtime)]
    pub runtime: f64,
    /// Byte offset where the I/O range starts.
    #[arg(long, value_name = "N", value_parser = parse_offset, default_value = "0")]
    pub offset: u64,
    /// Bytes in the I/O range (default: to the end of the device). With the embedded server,
    /// the RAM disk is made at least --offset + --size bytes (default 1G).
    #[arg(long, visible_alias = "length", value_name = "SIZE", value_parser = parse_size)]
    pub size: Option<u64>,
    /// Poll the used ring for completions (default), paced (see --no-pacing).
    #[arg(long, conflicts_with = "interrupt")]
    pub poll: bool,
    /// Sleep on the completion eventfd (BlkQueue::wait) when nothing has completed.
    #[arg(long)]
    pub interrupt: bool,
    /// With --interrupt: hybrid waiting. With at most two requests in flight, poll the used
    /// ring for up to N microseconds (1-1000) before sleeping; a spin that runs out makes the
    /// next 1, 2, 4 ... 64 waits sleep at once (BlkQueue::set_spin_before_sleep).
    #[arg(long, value_name = "N", requires = "interrupt",
          value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub spin_us: Option<u64>,
    /// With --interrupt: wake up after the first completion, instead of asking the device
    /// (EVENT_IDX) to signal once half of the requests in flight have completed.
    #[arg(long)]
    pub no_batch_completions: bool,
    /// In poll mode, poll the used ring flat out. By default, after a pass that completed
    /// something, the worker leaves the ring alone for an eighth of the latency of what is in
    /// flight, at most 4 µs (virtio_blk_dev::PollPacer), so a back-end on another core does not
    /// lose the ring's cache lines to the driver at every request.
    #[arg(long, conflicts_with = "interrupt")]
    pub no_pacing: bool,
    /// With INDIRECT negotiated, put every request into an indirect table. By default a
    /// request takes three ring descriptors instead when the queue holds three per request
    /// in flight (BlkQueue::set_direct_descriptors), which devices serve faster.
    #[arg(long)]
    pub all_indirect: bool,
    /// Print one JSON object on stdout instead of text, and no progress.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Unix socket path to listen on (a stale socket file there is replaced).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Image file to serve; its size is the capacity. Default: sparse RAM.
    #[arg(long, value_name = "FILE", conflicts_with = "size")]
    pub image: Option<PathBuf>,
    /// Size of the RAM disk, e.g. 512M, 4G, 1048576 (a multiple of 512 bytes).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value_t = DEFAULT_RAM_SIZE)]
    pub size: u64,
    /// Number of request queues (one worker thread each).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_QUEUES)))]
    pub queues: u16,
    /// Maximum queue size offered (a power of two).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_QUEUE_SIZE, value_parser = parse_queue_size)]
    pub queue_size: u16,
    /// Serve read-only: writes fail with VIRTIO_BLK_S_IOERR.
    #[arg(long)]
    pub read_only: bool,
    /// Device id returned by GET_ID (at most 20 bytes).
    #[arg(long, value_name = "ID", default_value = "uvirtio-vblk")]
    pub serial: String,
    /// Offer packed virtqueues (VIRTIO_F_RING_PACKED) as well as split ones.
    #[arg(long)]
    pub packed: bool,
    /// Microseconds each worker keeps polling its queue, with kicks suppressed, after the
    /// last request it found, before it sleeps until a kick (0: sleep at once).
    #[arg(long, value_name = "US", default_value_t = DEFAULT_POLL.as_micros() as u64,
          value_parser = clap::value_parser!(u64).range(0..=MAX_POLL_US))]
    pub poll_us: u64,
}

/// Parses a byte count with an optional K/M/G/T suffix (powers of 1024; "KiB", "KB" and "K"
/// alike), without the multiple-of-512 check.
fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size (try 512M or 4G)"))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("'{s}' has an unknown unit (use K, M, G or T)")),
    };
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("'{s}' is too large"))
}

/// Parses a byte count with an optional K/M/G/T suffix (powers of 1024; "KiB", "KB" and "K" alike).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bytes = parse_bytes(s)?;
    if bytes == 0 || bytes % 512 != 0 {
        return Err(format!("'{s}' is not a non-zero multiple of 512 bytes"));
    }
    Ok(bytes)
}

/// Parses a byte offset (K/M/G/T suffixes; 0 allowed). Alignment to the device's block size
/// is checked once the device is open.
fn parse_offset(s: &str) -> Result<u64, String> {
    parse_bytes(s)
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(n) if n >= 2 && n.is_power_of_two() => Ok(n),
        _ => Err(format!("'{s}' is not a power of two between 2 and 32768")),
    }
}

fn parse_runtime(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 1e6 => Ok(v),
        _ => Err(format!("'{s}' is not a number of seconds greater than 0")),
    }
}

/// clap's error message on one line: the lines before the usage block, joined.
pub fn one_line(e: &clap::Error) -> String {
    let text = e.to_string();
    let parts: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
        .collect();
    format!("vblk: {}", parts.join(" ").trim_start_matches("error: "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert!(parse_size("100").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("M").is_err());
    }

    #[test]
    fn offsets_and_runtimes() {
        assert_eq!(parse_offset("0"), Ok(0));
        assert_eq!(parse_offset("1M"), Ok(1 << 20));
        assert_eq!(parse_offset("100"), Ok(100));
        assert!(parse_offset("-1").is_err());
        assert_eq!(parse_runtime("0.5"), Ok(0.5));
        assert!(parse_runtime("0").is_err());
        assert!(parse_runtime("nan").is_err());
        assert!(parse_runtime("x").is_err());
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
