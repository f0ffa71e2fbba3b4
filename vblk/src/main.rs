//! The `vblk` command-line tool.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use vblk::server::{Server, ServerOptions, Storage, DEFAULT_QUEUE_SIZE, DEFAULT_RAM_SIZE, MAX_QUEUES};

/// Drive virtio-blk devices from user space.
#[derive(Parser, Debug)]
#[command(name = "vblk", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the embedded vhost-user-blk server alone, for other front-ends, until killed.
    Serve(ServeArgs),
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Unix socket path to listen on (a stale socket file there is replaced).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Image file to serve; its size is the capacity. Default: sparse RAM.
    #[arg(long, value_name = "FILE", conflicts_with = "size")]
    image: Option<PathBuf>,
    /// Size of the RAM disk, e.g. 512M, 4G, 1048576 (a multiple of 512 bytes).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value_t = DEFAULT_RAM_SIZE)]
    size: u64,
    /// Number of request queues (one worker thread each).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_QUEUES)))]
    queues: u16,
    /// Maximum queue size offered (a power of two).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_QUEUE_SIZE, value_parser = parse_queue_size)]
    queue_size: u16,
    /// Serve read-only: writes fail with VIRTIO_BLK_S_IOERR.
    #[arg(long)]
    read_only: bool,
    /// Device id returned by GET_ID (at most 20 bytes).
    #[arg(long, value_name = "ID", default_value = "uvirtio-vblk")]
    serial: String,
}

/// Parses a byte count with an optional K/M/G/T suffix (powers of 1024; "KiB", "KB" and "K" alike).
fn parse_size(s: &str) -> Result<u64, String> {
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
    let bytes = n.checked_mul(1u64 << shift).ok_or_else(|| format!("'{s}' is too large"))?;
    if bytes == 0 || bytes % 512 != 0 {
        return Err(format!("'{s}' is not a non-zero multiple of 512 bytes"));
    }
    Ok(bytes)
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(n) if n >= 2 && n.is_power_of_two() => Ok(n),
        _ => Err(format!("'{s}' is not a power of two between 2 and 32768")),
    }
}

/// clap's error message on one line: the lines before the usage block, joined.
fn one_line(e: &clap::Error) -> String {
    let text = e.to_string();
    let parts: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
        .collect();
    format!("vblk: {}", parts.join(" ").trim_start_matches("error: "))
}

/// Prints `warn!` and above from the library to stderr.
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            eprintln!("vblk: {}: {}", r.level().as_str().to_ascii_lowercase(), r.args());
        }
    }
    fn flush(&self) {}
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{}", one_line(&e));
            return ExitCode::from(2);
        }
    };
    let _ = log::set_logger(&StderrLogger).map(|()| log::set_max_level(log::LevelFilter::Warn));
    match cli.command {
        Command::Serve(a) => serve(a),
    }
}

fn serve(a: ServeArgs) -> ExitCode {
    let storage = match a.image {
        Some(path) => Storage::Image(path),
        None => Storage::Ram { size: a.size },
    };
    let options =
        ServerOptions { storage, queues: a.queues, queue_size: a.queue_size, read_only: a.read_only, serial: a.serial };
    match Server::start(&a.socket, options) {
        Ok(handle) => {
            eprintln!(
                "vblk: serving {} sectors of 512 bytes{} on {}",
                handle.capacity_sectors(),
                if a.read_only { " read-only" } else { "" },
                handle.socket_path().display()
            );
            handle.wait();
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vblk: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

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
}
