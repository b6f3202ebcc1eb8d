//! The stats read model: per-wallet totals, counts, last activity, and the
//! latest fraud flag mirrored as `suspicious` / `suspiciousReason`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::flags::{self, FraudRules};
use super::{Batch, Doc, Projection};
use crate::aggregate::{Balance, WalletEvent};
use crate::store::RecordedEvent;

pub const NAME: &str = "stats";
pub const KIND: &str = "stats";

/// A wallet's stats, as served by `GET /wallet/{id}/stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WalletStats {
    pub wallet_id: String,
    #[schema(value_type = String, example = "100.0000")]
    pub total_deposited: Balance,
    #[schema(value_type = String)]
    pub total_withdrawn: Balance,
    #[schema(value_type = String)]
    pub total_transferred_out: Balance,
    #[schema(value_type = String)]
    pub total_transferred_in: Balance,
    pub deposit_count: u64,
    pub withdrawal_count: u64,
    pub transfer_out_count: u64,
    pub transfer_in_count: u64,
    /// Event time of the wallet's latest event.
    pub last_activity_at: Option<DateTime<Utc>>,
    pub suspicious: bool,
    pub suspicious_reason: Option<String>,
    /// Holds (stats stored before holds existed read as zero).
    #[serde(default)]
    pub holds_placed: u64,
    #[serde(default)]
    pub holds_captured: u64,
    #[serde(default)]
    pub holds_voided: u64,
    #[serde(default)]
    pub holds_expired: u64,
    /// Money taken by captures.
    #[serde(default)]
    #[schema(value_type = String)]
    pub total_captured: Balance,
}

impl WalletStats {
    /// Stats of a wallet with no events.
    pub fn empty(wallet_id: &str) -> Self {
        Self {
            wallet_id: wallet_id.to_owned(),
            total_deposited: Balance::ZERO,
            total_withdrawn: Balance::ZERO,
            total_transferred_out: Balance::ZERO,
            total_transferred_in: Balance::ZERO,
            deposit_count: 0,
            withdrawal_count: 0,
            transfer_out_count: 0,
            transfer_in_count: 0,
            last_activity_at: None,
            suspicious: false,
            suspicious_reason: None,
            holds_placed: 0,
            holds_captured: 0,
            holds_voided: 0,
            holds_expired: 0,
            total_captured: Balance::ZERO,
        }
    }

    /// Pure: one event's effect on the totals. Sums saturate at the largest
    /// balance rather than fail (a projection must not stop on arithmetic).
    pub fn apply(&mut self, e: &RecordedEvent) {
        let add = |total: &mut Balance, amount| {
            if let Some(sum) = total.checked_add(amount) {
                *total = sum;
            }
        };
        match &e.event {
            WalletEvent::WalletCreated(_) => {}
            WalletEvent::FundsDeposited(p) => {
                add(&mut self.total_deposited, p.amount);
                self.deposit_count += 1;
            }
            WalletEvent::FundsWithdrawn(p) => {
                add(&mut self.total_withdrawn, p.amount);
                self.withdrawal_count += 1;
            }
            WalletEvent::TransferDebited(p) => {
                add(&mut self.total_transferred_out, p.amount);
                self.transfer_out_count += 1;
            }
            WalletEvent::TransferCredited(p) => {
                add(&mut self.total_transferred_in, p.amount);
                self.transfer_in_count += 1;
            }
            WalletEvent::HoldPlaced(_) => self.holds_placed += 1,
            WalletEvent::HoldCaptured(p) => {
                add(&mut self.total_captured, p.amount);
                self.holds_captured += 1;
            }
            WalletEvent::HoldVoided(_) => self.holds_voided += 1,
            WalletEvent::HoldExpired(_) => self.holds_expired += 1,
            WalletEvent::WalletLimitsChanged(_) => {}
        }
        self.last_activity_at = Some(e.recorded_at);
    }
}

pub fn stats_key(wallet: &str) -> String {
    format!("s/{wallet}")
}

pub struct Stats {
    pub rules: FraudRules,
}

impl Projection for Stats {
    fn name(&self) -> &'static str {
        NAME
    }

    fn reads(&self, e: &RecordedEvent) -> Vec<String> {
        let mut keys = vec![stats_key(e.stream.as_str())];
        if flags::is_outflow(&e.event) {
            keys.push(flags::window_key(e.stream.as_str()));
        }
        keys
    }

    fn apply(&self, e: &RecordedEvent, batch: &mut Batch) {
        let wallet = e.stream.as_str();
        let key = stats_key(wallet);
        let mut stats: WalletStats = batch
            .get(&key)
            .and_then(|d| serde_json::from_str(&d.body).ok())
            .unwrap_or_else(|| WalletStats::empty(wallet));
        stats.apply(e);

        if flags::is_outflow(&e.event) {
            let window_key = flags::window_key(wallet);
            let mut window = flags::load_window(batch, &window_key);
            if let Some(latest) = flags::detect(&self.rules, &mut window, e).pop() {
                stats.suspicious = true;
                stats.suspicious_reason = Some(format!("{}: {}", latest.rule, latest.reason));
            }
            batch.put(flags::window_doc(window_key, wallet, &window));
        }
        batch.put(Doc {
            key,
            kind: KIND.to_owned(),
            wallet_id: wallet.to_owned(),
            sort: e.position,
            tag: None,
            body: serde_json::to_string(&stats).expect("stats serialise"),
        });
    }
}
