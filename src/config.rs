//! Where the service finds its database, and logging set-up.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use tracing_subscriber::EnvFilter;

use crate::store::{EventStore, StoreError};

/// File name of the embedded database inside the data directory.
const SQLITE_FILE: &str = "wallet.db";

/// `DATABASE_URL` if set, else an SQLite file in `data_dir`. Creates
/// nothing: only the commands that migrate create the directory.
pub fn database_url(explicit: Option<&str>, data_dir: &Path) -> String {
    match explicit {
        Some(url) if !url.trim().is_empty() => url.to_owned(),
        _ => format!("sqlite://{}", data_dir.join(SQLITE_FILE).display()),
    }
}

/// The file of an SQLite URL (`None` for other backends and `:memory:`).
fn sqlite_file(url: &str) -> Option<PathBuf> {
    let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or(rest);
    (!path.is_empty() && !path.contains(":memory:")).then(|| PathBuf::from(path))
}

/// Connects and applies migrations: what `serve`, `migrate`, `worker` and
/// `relay` do first (an SQLite file and its directory are created).
pub async fn open_store(url: &str) -> Result<EventStore, OpenError> {
    if let Some(dir) = sqlite_file(url).as_deref().and_then(Path::parent) {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Io(format!("creating {}", dir.display()), e))?;
        }
    }
    let store = connect(url).await?;
    store.migrate().await?;
    Ok(store)
}

/// Why a read-only command cannot read the database.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("no database at {0} (run `wallet migrate` or `wallet serve` first, or set DATABASE_URL)")]
    NoFile(String),
    #[error("{0} holds no wallet schema (run `wallet migrate` first)")]
    NoSchema(String),
    #[error("{database} has schema version {found}; this binary reads {expected} (run `wallet migrate`)")]
    Behind {
        database: String,
        found: i64,
        expected: i64,
    },
    /// What was tried (never the password) and the first cause, once.
    #[error("cannot connect to {target}: {cause}")]
    Connect { target: String, cause: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Connects; a failure names the server, database and user tried and the
/// first cause (the pool alone says only that it timed out).
async fn connect(url: &str) -> Result<EventStore, OpenError> {
    match EventStore::connect(url).await {
        Ok(store) => Ok(store),
        Err(e @ StoreError::BadUrl(_)) => Err(e.into()),
        Err(e) => Err(OpenError::Connect {
            target: describe_target(url),
            cause: first_cause(url, e).await,
        }),
    }
}

/// "PostgreSQL at host:port, database D, user U" or "SQLite file F".
fn describe_target(url: &str) -> String {
    if let Some(file) = sqlite_file(url) {
        return format!("SQLite file {}", file.display());
    }
    match crate::store::cluster::Cluster::parse(url) {
        Ok(c) => format!(
            "PostgreSQL at {}, database {}, user {}",
            c.describe(),
            c.first().get_database().unwrap_or(c.first().get_username()),
            c.first().get_username()
        ),
        Err(_) => redact_url(url),
    }
}

/// The innermost error's text: the one that says what happened.
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut e = e;
    while let Some(inner) = e.source() {
        e = inner;
    }
    e.to_string()
}

async fn first_cause(url: &str, e: StoreError) -> String {
    use sqlx::Connection as _;
    use std::str::FromStr;
    let inner = match e {
        StoreError::Unavailable(inner) | StoreError::Database(inner) => inner,
        other => return other.to_string(),
    };
    // A pool that timed out hides why: one direct attempt finds out.
    if matches!(inner, sqlx::Error::PoolTimedOut) && sqlite_file(url).is_none() {
        if let Ok(options) = sqlx::postgres::PgConnectOptions::from_str(url) {
            let direct = sqlx::PgConnection::connect_with(&options);
            match tokio::time::timeout(std::time::Duration::from_secs(5), direct).await {
                Ok(Err(e)) => return innermost(&e),
                Err(_) => return "no answer within 5 s".to_owned(),
                Ok(Ok(_)) => {}
            }
        }
    }
    innermost(&inner)
}

/// Connects for a command that only reads (`replay`, `verify`, `tail`,
/// `projections status`...): applies no migration, creates no table or
/// file, works on a read-only connection, and says so when the schema is
/// missing or older than this binary's.
pub async fn open_existing(url: &str) -> Result<EventStore, OpenError> {
    if let Some(file) = sqlite_file(url) {
        if !file.exists() {
            return Err(OpenError::NoFile(file.display().to_string()));
        }
    }
    let store = connect(url).await?;
    let database = redact_url(url);
    let (found, expected) = match &store {
        EventStore::Postgres(s) => {
            let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
                .fetch_one(s.pool())
                .await
                .map_err(StoreError::from)?;
            if !exists {
                return Err(OpenError::NoSchema(database));
            }
            let found: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM _sqlx_migrations WHERE success")
                .fetch_one(s.pool())
                .await
                .map_err(StoreError::from)?;
            (found, newest(&sqlx::migrate!("./migrations/postgres")))
        }
        EventStore::Sqlite(s) => {
            let exists: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
            )
            .fetch_one(s.reader())
            .await
            .map_err(StoreError::from)?;
            if exists == 0 {
                return Err(OpenError::NoSchema(database));
            }
            let found: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM _sqlx_migrations WHERE success")
                .fetch_one(s.reader())
                .await
                .map_err(StoreError::from)?;
            (found, newest(&sqlx::migrate!("./migrations/sqlite")))
        }
    };
    if found < expected {
        return Err(OpenError::Behind {
            database,
            found,
            expected,
        });
    }
    Ok(store)
}

fn newest(migrator: &sqlx::migrate::Migrator) -> i64 {
    migrator.iter().map(|m| m.version).max().unwrap_or(0)
}

/// What must live until exit: the log file's writer and the span exporter
/// (dropping it flushes both).
pub struct LoggingGuard {
    _file: Option<tracing_appender::non_blocking::WorkerGuard>,
    tracer: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for LoggingGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.tracer.take() {
            if let Err(e) = provider.shutdown() {
                eprintln!("spans not exported at exit: {e}");
            }
        }
    }
}

/// JSON lines when stderr is not a terminal (production, CI), readable text
/// on a terminal. `RUST_LOG` filters (default `info`; lapin's own lines are
/// off: every broker error it returns is logged once by its caller). With `LOG_DIR` set,
/// JSON lines also go to a daily rolling file `wallet.log.<date>` there.
/// With `OTEL_EXPORTER_OTLP_ENDPOINT` set, spans are also exported over
/// OTLP/HTTP (the exporter reads the standard `OTEL_*` variables); unset,
/// nothing of OpenTelemetry runs. Keep the returned guard alive.
pub fn init_logging() -> LoggingGuard {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    // RUST_LOG filters the log lines only: exported spans keep their own
    // level, so a quiet log does not silence the traces.
    // lapin's own lines stay off unless RUST_LOG names lapin.
    let filter = || {
        let spec = std::env::var("RUST_LOG").unwrap_or_else(|_| "info,sqlx::postgres::notice=warn".to_owned());
        let spec = if spec.contains("lapin") {
            spec
        } else {
            format!("{spec},lapin=off")
        };
        EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("info,sqlx::postgres::notice=warn,lapin=off"))
    };
    let stderr = if std::io::stderr().is_terminal() {
        tracing_subscriber::fmt::layer().with_writer(|| AboveBars).boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .boxed()
    };
    let (file, guard) = match std::env::var("LOG_DIR").ok().filter(|d| !d.trim().is_empty()) {
        Some(dir) => {
            let (writer, guard) = tracing_appender::non_blocking(tracing_appender::rolling::daily(dir, "wallet.log"));
            let layer = tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_writer(writer)
                .with_filter(filter());
            (Some(layer), Some(guard))
        }
        None => (None, None),
    };
    let (otel, tracer) = match otlp_tracer() {
        Some((tracer, provider)) => {
            let layer = tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
            (Some(layer), Some(provider))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(stderr.with_filter(filter()))
        .with(file)
        .with(otel)
        .init();
    LoggingGuard { _file: guard, tracer }
}

/// The progress bars on stderr. Every bar is drawn through this, and on a
/// terminal the log writes its lines through [`AboveBars`]: a log line then
/// never lands inside a bar, and the bars are drawn again below it.
pub fn progress_bars() -> &'static indicatif::MultiProgress {
    static BARS: std::sync::OnceLock<indicatif::MultiProgress> = std::sync::OnceLock::new();
    BARS.get_or_init(indicatif::MultiProgress::new)
}

/// The terminal log's writer: each line is written with the progress bars
/// cleared (indicatif's `suspend`), which then draw again under it. Chosen
/// over tracing-indicatif, which draws bars for spans: ours are plain
/// indicatif bars, and serve's request spans must not grow spinners.
struct AboveBars;

impl std::io::Write for AboveBars {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        progress_bars().suspend(|| std::io::stderr().write(buf))
    }

    /// The formatter writes a whole line at once: clear the bars once per line.
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        progress_bars().suspend(|| std::io::stderr().write_all(buf))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// The OTLP exporter's tracer, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
fn otlp_tracer() -> Option<(
    opentelemetry_sdk::trace::SdkTracer,
    opentelemetry_sdk::trace::SdkTracerProvider,
)> {
    use opentelemetry::trace::TracerProvider as _;
    std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .ok()
        .filter(|e| !e.trim().is_empty())?;
    let exporter = match opentelemetry_otlp::SpanExporter::builder().with_http().build() {
        Ok(exporter) => exporter,
        Err(e) => {
            eprintln!("OTEL_EXPORTER_OTLP_ENDPOINT is set but the exporter could not be built: {e}");
            return None;
        }
    };
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("wallet")
        .build();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    Some((provider.tracer("wallet"), provider))
}

/// Makes `span` continue the trace of a W3C `traceparent` (a write's, as
/// kept in its events): spans of the request, the relay's publish and the
/// worker's update then share one trace. Without an exporter it costs
/// nothing visible.
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) {
    use opentelemetry::propagation::TextMapPropagator as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let Some(traceparent) = traceparent else { return };
    let carrier = std::collections::HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let parent = opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(parent);
}

/// A duration written `<number><unit>`: `ms`, `s`, `m`, `h`, `d` or `w`
/// (e.g. `500ms`, `5s`, `90d`). For flags and variables.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 500ms, 5s, 10m, 90d)"))?;
    let unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "w" => 7 * 86_400_000,
        _ => return Err(format!("{text:?}: the unit must be ms, s, m, h, d or w")),
    };
    n.checked_mul(unit_ms)
        .map(std::time::Duration::from_millis)
        .ok_or_else(|| format!("{text:?} is too long"))
}

/// Hides the password of a URL before it is logged.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{}:***{}", &url[..scheme + 3], user, &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_their_unit() {
        use std::time::Duration;
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("90d"), Ok(Duration::from_secs(90 * 86_400)));
        assert_eq!(parse_duration("2w"), Ok(Duration::from_secs(14 * 86_400)));
        for bad in ["", "5", "s", "5x", "-5s", "1.5s", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sqlite_urls_name_their_file() {
        assert_eq!(
            sqlite_file("sqlite://data/wallet.db"),
            Some(PathBuf::from("data/wallet.db"))
        );
        assert_eq!(
            sqlite_file("sqlite:///tmp/w.db?mode=rwc"),
            Some(PathBuf::from("/tmp/w.db"))
        );
        assert_eq!(sqlite_file("sqlite::memory:"), None);
        assert_eq!(sqlite_file("postgres://h/db"), None);
        assert_eq!(database_url(None, Path::new("d")), "sqlite://d/wallet.db");
    }

    #[test]
    fn passwords_never_reach_the_log() {
        assert_eq!(redact_url("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("sqlite://data/wallet.db"), "sqlite://data/wallet.db");
    }
}
