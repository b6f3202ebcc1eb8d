//! `wallet load`: the load generator. Drives a running server over HTTP;
//! opens no database.

use std::time::Duration;

use clap::Args;

use super::table;

#[derive(Args, Debug)]
pub struct LoadArgs {
    /// Base URL of the server under load (`host:port` means http://).
    #[arg(long, default_value = "http://127.0.0.1:3000")]
    pub url: String,
    /// Another server on the same database (repeatable): connections are
    /// spread over all of them, so they write the same wallets.
    #[arg(long = "also-url")]
    pub also_urls: Vec<String>,
    /// Wallets the workload spreads over (created by the run).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(2..=100_000))]
    pub wallets: u64,
    /// Requests in flight at once (keep-alive connections).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub concurrency: u64,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub seconds: u64,
    /// Stop after this many requests (at most 10,000,000).
    #[arg(long, default_value_t = 1_000_000)]
    pub requests: u64,
    /// Percent deposits,withdrawals,transfers.
    #[arg(long, default_value = "40,30,30", value_parser = parse_mix)]
    pub mix: [u8; 3],
    /// Balance reads (GET /wallet/{id}) instead of writes.
    #[arg(long)]
    pub reads: bool,
    /// With --reads: appended to each read's /wallet/{id}, e.g.
    /// '?minPosition=1' (standbys may answer) or '/history?minPosition=1'.
    #[arg(long, default_value = "")]
    pub read_suffix: String,
    /// After each write answered 201, read its wallet (with --read-suffix)
    /// with minPosition = the write's position, and time that read
    /// (readAfterWrite): the wait for a standby to replay a write.
    #[arg(long, conflicts_with = "reads")]
    pub read_after_write: bool,
    /// Every write carries a unique requestId (an idempotency key).
    #[arg(long)]
    pub keyed: bool,
    /// Live subscribers to GET /events/stream during the run: prints the
    /// time from a write's 201 to its event reaching them.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1000))]
    pub subscribers: u64,
    /// Percent of operations on holds (place, then capture or void).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub holds: u8,
    /// Send every request as POST /batch of this many independent operations.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1000))]
    pub batch: u64,
    /// With --batch: atomic batches (all or none) instead of independent ones.
    #[arg(long, requires = "batch")]
    pub atomic: bool,
    /// API key sent as `Authorization: Bearer <key>` (see `wallet keys`;
    /// the writes need the write scope).
    #[arg(long, env = "WALLET_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// `--mix D,W,T`: three percentages (deposits, withdrawals, transfers)
/// adding up to 100.
fn parse_mix(text: &str) -> Result<[u8; 3], String> {
    let parts: Vec<&str> = text.split(',').map(str::trim).collect();
    let numbers: Vec<u8> = parts.iter().filter_map(|p| p.parse::<u8>().ok()).collect();
    match numbers[..] {
        [d, w, t] if parts.len() == 3 && u32::from(d) + u32::from(w) + u32::from(t) == 100 => Ok([d, w, t]),
        _ => Err(format!("{text:?}: three percentages adding up to 100, e.g. 40,30,30")),
    }
}

/// `host:port` as `http://host:port`: a URL without a scheme is plain HTTP
/// (not "relative URL without a base").
fn with_scheme(url: &str) -> String {
    let url = url.trim().trim_end_matches('/');
    if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    }
}

impl LoadArgs {
    fn config(&self) -> crate::load::LoadConfig {
        crate::load::LoadConfig {
            base_url: with_scheme(&self.url),
            other_urls: self.also_urls.iter().map(|u| with_scheme(u)).collect(),
            wallets: self.wallets as usize,
            concurrency: self.concurrency as usize,
            duration: Duration::from_secs(self.seconds),
            max_requests: self.requests,
            mix: self.mix,
            reads: self.reads,
            read_suffix: self.read_suffix.clone(),
            read_after_write: self.read_after_write,
            keyed: self.keyed,
            subscribers: self.subscribers as usize,
            holds: self.holds,
            batch: self.batch as usize,
            atomic: self.atomic,
            api_key: self.api_key.clone(),
        }
    }
}

pub(super) async fn run(args: LoadArgs) -> anyhow::Result<()> {
    let r = crate::load::run(args.config()).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print_report(&r)?;
    }
    anyhow::ensure!(
        r.conservation_ok && r.no_negative_balance,
        "the server lost or invented money"
    );
    Ok(())
}

fn print_report(r: &crate::load::LoadReport) -> anyhow::Result<()> {
    println!(
        "{} requests in {:.1} s: {:.0} requests/s, {:.0} operations/s",
        r.requests, r.seconds, r.requests_per_sec, r.operations_per_sec
    );
    let mut rows = Vec::with_capacity(r.by_op.len());
    for (op, s) in &r.by_op {
        let op = serde_json::to_value(op)?.as_str().unwrap_or("?").to_owned();
        let ms = |v: f64| format!("{v:.2}");
        rows.push(vec![
            op,
            s.count.to_string(),
            ms(s.p50_ms),
            ms(s.p90_ms),
            ms(s.p99_ms),
            ms(s.max_ms),
        ]);
    }
    let header = ["op", "count", "p50 ms", "p90 ms", "p99 ms", "max ms"];
    println!("{}", table(&header, &[1, 2, 3, 4, 5], rows));
    let statuses: Vec<String> = r.by_status.iter().map(|(s, n)| format!("{s}: {n}")).collect();
    println!(
        "statuses {}; transport errors {}",
        statuses.join(", "),
        r.transport_errors
    );
    println!(
        "conservation {} (expected {}, found {}); negative balances: {}",
        if r.conservation_ok { "ok" } else { "FAILED" },
        r.expected_total,
        r.actual_total,
        if r.no_negative_balance { "none" } else { "FOUND" }
    );
    if let Some(live) = &r.live {
        println!(
            "live: {} subscribers, {} deliveries, 201 -> event p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            live.subscribers, live.samples, live.p50_ms, live.p99_ms, live.max_ms
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{Cli, Command};
    use super::*;
    use clap::Parser;

    #[test]
    fn the_mix_is_three_percentages_adding_up_to_100() {
        assert_eq!(parse_mix("40,30,30"), Ok([40, 30, 30]));
        assert_eq!(parse_mix("100, 0, 0"), Ok([100, 0, 0]));
        for bad in ["40,30", "40,30,20", "40,30,30,0", "a,b,c", "", "300,0,0"] {
            assert!(parse_mix(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_load_url_without_a_scheme_is_http() {
        assert_eq!(with_scheme("127.0.0.1:3000"), "http://127.0.0.1:3000");
        assert_eq!(with_scheme("https://w.example/"), "https://w.example");
    }

    #[test]
    fn load_takes_the_mix_in_the_form_its_help_shows() {
        let cli = Cli::try_parse_from(["wallet", "load", "--mix", "40,30,30"]).unwrap();
        let Command::Load(args) = cli.command else {
            panic!("load")
        };
        assert_eq!(args.mix, [40, 30, 30]);
        assert!(Cli::try_parse_from(["wallet", "--fraud-large-amount", "0", "migrate"]).is_err());
    }
}
