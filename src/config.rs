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

/// JSON lines when stdout is not a terminal (production, CI), readable text
/// on a terminal. `RUST_LOG` filters (default `info`).
pub fn init_logging() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx::postgres::notice=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::io::stderr().is_terminal() {
        builder.init();
    } else {
        builder.json().flatten_event(true).with_current_span(true).init();
    }
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
