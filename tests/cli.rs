//! The command line as an operator meets it, through the real binary: what
//! `--help` shows, which commands change nothing, and how they fail.

mod common;

use std::process::{Command, Output, Stdio};

/// The binary with a clean environment of its own (no `.env` values leak
/// in from the working directory): run in a fresh temp directory.
fn wallet(args: &[&str]) -> Command {
    let dir = std::env::temp_dir().join(format!("wallet-cli-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_wallet"));
    c.args(args)
        .current_dir(dir)
        .env_remove("DATABASE_URL")
        .env_remove("AMQP_URL")
        .env_remove("API_KEYS")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    c
}

fn run(c: &mut Command) -> Output {
    c.output().expect("the wallet binary runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn help_never_shows_secrets_from_the_environment() {
    for sub in ["serve", "worker", "relay", "dlq", "verify", "load"] {
        let out = run(wallet(&[sub, "--help"])
            .env("DATABASE_URL", "postgres://app:db-s3cret@db/wallet")
            .env("AMQP_URL", "amqp://app:mq-s3cret@mq/%2f")
            .env("API_KEYS", "ops:admin:key-s3cret")
            .env("WALLET_API_KEY", "wk_client-s3cret"));
        let help = text(&out);
        assert!(out.status.success(), "{sub} --help: {help}");
        assert!(help.contains("DATABASE_URL"), "{sub} --help names the variable: {help}");
        assert!(!help.contains("s3cret"), "{sub} --help shows a secret: {help}");
    }
}
