//! The `wallet` binary: parses the command line and runs it.
//!
//! A failure is printed as one line, `error: <what>: <cause>`, with exit
//! status 1: an operator's mistake (a missing schema, a wrong password) is
//! not a crash, so no backtrace, whatever `RUST_BACKTRACE` says.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    // A missing .env file is normal.
    let _ = dotenvy::dotenv();
    let cli = wallet::cli::Cli::parse();
    if !cli.command.is_service() {
        // `wallet projections status | head`: a closed pipe ends a printing
        // command quietly, as it does any Unix tool, instead of a panic in
        // println!. (Sockets are written with MSG_NOSIGNAL: unaffected.)
        // SAFETY: called before any thread of ours exists.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let _log_file = wallet::config::init_logging();
    match wallet::cli::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
