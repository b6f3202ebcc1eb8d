//! `wallet tail`: prints the committed log in position order, and with
//! `--follow` keeps printing. Read-only: opens the database as it is.

use std::io::Write as _;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::aggregate::EVENT_TYPES;
use crate::config;
use crate::store::RecordedEvent;

#[derive(Args, Debug)]
pub struct TailArgs {
    /// Start after this log position (0: the beginning).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i64).range(0..))]
    pub after: i64,
    /// Keep following the log (until Ctrl-C).
    #[arg(long)]
    pub follow: bool,
    /// Only this wallet's events.
    #[arg(long)]
    pub wallet: Option<String>,
    /// Only events of this type (repeatable), e.g. --type FundsDeposited.
    #[arg(long = "type")]
    pub types: Vec<String>,
    /// One JSON object per line (the public event shape, as GET /events).
    #[arg(long)]
    pub json: bool,
}

/// Pages of the log, then (with --follow) a poll every 200 ms. A closed
/// pipe (`| head`) ends it quietly.
pub(super) async fn run(args: TailArgs, url: &str) -> anyhow::Result<()> {
    let store = config::open_existing(url).await.context("opening the event store")?;
    let wallet = args
        .wallet
        .as_deref()
        .map(crate::aggregate::WalletId::parse)
        .transpose()
        .context("--wallet")?;
    let filter = crate::store::LogFilter {
        wallet,
        types: args.types,
    };
    let mut after = args.after;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    loop {
        let events = store.read_log(after, crate::feed::PAGE, &filter).await?;
        for e in &events {
            after = e.position;
            let line = if args.json {
                serde_json::to_string(&crate::feed::LogEvent::of(e))?
            } else {
                line(e)
            };
            if writeln!(out, "{line}").is_err() {
                return Ok(());
            }
        }
        if events.len() < crate::feed::PAGE as usize {
            if !args.follow || out.flush().is_err() {
                let _ = out.flush();
                return Ok(());
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
        }
    }
}

/// The longest event type: the type column fits every type (lines are
/// printed as they come, so the width cannot be measured from the rows).
const TYPE_WIDTH: usize = {
    let (mut widest, mut i) = (0, 0);
    while i < EVENT_TYPES.len() {
        if EVENT_TYPES[i].len() > widest {
            widest = EVENT_TYPES[i].len();
        }
        i += 1;
    }
    widest
};

fn line(e: &RecordedEvent) -> String {
    let money = match (e.event.amount(), &e.event) {
        (Some(amount), event) => format!("{amount:>20} -> {}", event.balance_after()),
        (None, _) => String::new(),
    };
    format!(
        "{:>10}  {}  {:<24} v{:<6} {:<TYPE_WIDTH$} {money}",
        e.position,
        e.recorded_at.format("%Y-%m-%dT%H:%M:%S%.6fZ"),
        e.stream.as_str(),
        e.version,
        e.event.event_type()
    )
}
