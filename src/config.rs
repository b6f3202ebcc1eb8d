//! Where the service finds its database, and logging set-up.

use std::io::IsTerminal;
use std::path::Path;

use tracing_subscriber::EnvFilter;

use crate::store::{EventStore, StoreError};

/// File name of the embedded database inside the data directory.
const SQLITE_FILE: &str = "wallet.db";

/// `DATABASE_URL` if set, else an SQLite file in `data_dir` (created).
pub fn database_url(explicit: Option<&str>, data_dir: &Path) -> std::io::Result<String> {
    match explicit {
        Some(url) if !url.trim().is_empty() => Ok(url.to_owned()),
        _ => {
            std::fs::create_dir_all(data_dir)?;
            Ok(format!("sqlite://{}", data_dir.join(SQLITE_FILE).display()))
        }
    }
}

/// Connects and applies migrations: what `serve` and `migrate` both do first.
pub async fn open_store(url: &str) -> Result<EventStore, StoreError> {
    let store = EventStore::connect(url).await?;
    store.migrate().await?;
    Ok(store)
}

/// JSON lines when stderr is not a terminal (production, CI), readable text
/// on a terminal. `RUST_LOG` filters (default `info`). With `LOG_DIR` set,
/// JSON lines also go to a daily rolling file `wallet.log.<date>` there;
/// keep the returned guard alive so the file writer flushes at exit.
pub fn init_logging() -> Option<tracing_appender::non_blocking::WorkerGuard> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx::postgres::notice=warn"));
    let stderr = if std::io::stderr().is_terminal() {
        tracing_subscriber::fmt::layer().with_writer(std::io::stderr).boxed()
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
                .with_writer(writer);
            (Some(layer), Some(guard))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(stderr)
        .with(file)
        .init();
    guard
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
    fn passwords_never_reach_the_log() {
        assert_eq!(redact_url("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("sqlite://data/wallet.db"), "sqlite://data/wallet.db");
    }
}
