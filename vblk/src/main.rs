//! The `vblk` command-line tool: `info`, `read`, `write`, `verify`, `bench` on a virtio-blk
//! device (a vhost-user back-end, or the embedded server started in this process), and
//! `serve`, the embedded server alone.
//!
//! Every failure ends with one line on stderr, `vblk: ...`, and a non-zero exit status:
//! 2 for a command line clap refuses, 1 otherwise (including a `verify` mismatch and a `bench`
//! with failed requests).

mod cli;
mod commands;
mod signals;
mod stats;
mod target;
mod transport;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command};

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
    // A bug must still end with one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        eprintln!("vblk: internal error{at}: {}", msg.replace('\n', " "));
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{}", cli::one_line(&e));
            return ExitCode::from(2);
        }
    };
    let _ = log::set_logger(&StderrLogger).map(|()| log::set_max_level(log::LevelFilter::Warn));
    signals::install();
    let result = match cli.command {
        Command::Info(a) => commands::info::run(a),
        Command::Read(a) => commands::io::read(a),
        Command::Write(a) => commands::io::write(a),
        Command::Verify(a) => commands::verify::run(a),
        Command::Bench(a) => commands::bench::run(a),
        Command::Serve(a) => commands::serve::run(a),
    };
    match result {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("vblk: {}", msg.replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
