//! Coalesced freshness checks for balance reads: many concurrent reads,
//! one query.
//!
//! A read answered from the wallet cache must still be as fresh as the log
//! (another `serve` process may have written the wallet). Asking the log for
//! each wallet's current version separately would make every read a round
//! trip; instead, reads that arrive together are answered by one query
//! (`EventStore::stream_versions`: one backward index probe per wallet), the
//! way group commit batches appends. A wallet whose version moved is then read
//! in full by the caller (rare: only after another process wrote it).

use std::collections::HashMap;

use tokio::sync::{mpsc, oneshot};

use crate::aggregate::WalletId;
use crate::store::{EventStore, StoreError};

/// Wallets asked about per query, at most.
const MAX_BATCH: usize = 512;

struct Probe {
    wallet: WalletId,
    reply: oneshot::Sender<Result<u64, String>>,
}

/// Cheap to clone; one background task per store.
#[derive(Debug, Clone)]
pub struct VersionProbe {
    probes: mpsc::Sender<Probe>,
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probe").field("wallet", &self.wallet).finish()
    }
}

impl VersionProbe {
    pub fn spawn(store: EventStore) -> Self {
        let (probes, mut incoming) = mpsc::channel::<Probe>(4 * MAX_BATCH);
        tokio::spawn(async move {
            while let Some(first) = incoming.recv().await {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match incoming.try_recv() {
                        Ok(p) => batch.push(p),
                        Err(_) => break,
                    }
                }
                let mut streams: Vec<&str> = batch.iter().map(|p| p.wallet.as_str()).collect();
                streams.sort_unstable();
                streams.dedup();
                let answer = store.stream_versions(&streams).await;
                let versions: Result<HashMap<String, i64>, String> =
                    answer.map(|rows| rows.into_iter().collect()).map_err(|e| e.to_string());
                for probe in batch {
                    let version = match &versions {
                        Ok(v) => Ok(v.get(probe.wallet.as_str()).map_or(0, |v| *v as u64)),
                        Err(e) => Err(e.clone()),
                    };
                    // The reader may have gone away.
                    let _ = probe.reply.send(version);
                }
            }
        });
        Self { probes }
    }

    /// The wallet's current version in the log (0: no events).
    pub async fn version(&self, wallet: &WalletId) -> Result<u64, StoreError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || StoreError::BatchFailed("the version probe has stopped".to_owned());
        self.probes
            .send(Probe {
                wallet: wallet.clone(),
                reply,
            })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?.map_err(StoreError::BatchFailed)
    }
}
