//! Fraud rules and the flags read model.
//!
//! Rules look only at events and their recorded time, never the wall clock,
//! so a rebuild flags exactly what the live run flagged:
//! - `RAPID_OUTFLOWS`: `rapid_count` or more outflows (withdrawals or outgoing
//!   transfers) whose times lie within `rapid_window` of each other, i.e. in
//!   `[t - window, t]` for the outflow at `t` (bounded on both sides).
//! - `LARGE_OUTFLOW`: one outflow of at least `large_amount`.

use chrono::{DateTime, Duration, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Batch, Doc, Projection};
use crate::aggregate::WalletEvent;
use crate::store::{Position, RecordedEvent};

pub const NAME: &str = "flags";
pub const FLAG_KIND: &str = "flag";
const WINDOW_KIND: &str = "window";

pub const RAPID_OUTFLOWS: &str = "RAPID_OUTFLOWS";
pub const LARGE_OUTFLOW: &str = "LARGE_OUTFLOW";

/// Thresholds of the fraud rules. Changing them changes what a rebuild
/// produces: rebuild `stats` and `flags` after a change.
#[derive(Debug, Clone, PartialEq)]
pub struct FraudRules {
    pub rapid_count: u32,
    pub rapid_window: Duration,
    pub large_amount: Decimal,
}

impl Default for FraudRules {
    fn default() -> Self {
        Self {
            rapid_count: 3,
            rapid_window: Duration::seconds(60),
            large_amount: Decimal::from(10_000),
        }
    }
}

/// A fraud flag, as served by `GET /flags`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Flag {
    /// `RAPID_OUTFLOWS` or `LARGE_OUTFLOW`.
    pub rule: String,
    pub reason: String,
    pub wallet_id: String,
    /// The events that together triggered the rule, oldest first.
    pub event_ids: Vec<Uuid>,
    /// Event time of the triggering event.
    pub flagged_at: DateTime<Utc>,
    /// Log position of the triggering event.
    pub position: Position,
}

/// The recent outflows of one wallet: all the rapid rule needs to remember.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OutflowWindow {
    recent: Vec<(DateTime<Utc>, Uuid)>,
}

pub fn is_outflow(event: &WalletEvent) -> bool {
    outflow(event).is_some()
}

/// Amount of an outflow event, `None` for credits.
fn outflow(event: &WalletEvent) -> Option<Decimal> {
    match event {
        WalletEvent::FundsWithdrawn(p) => Some(p.amount.value()),
        WalletEvent::TransferDebited(p) => Some(p.amount.value()),
        // A capture takes the captured money out of the wallet.
        WalletEvent::HoldCaptured(p) => Some(p.amount.value()),
        _ => None,
    }
}

/// Pure: the flags one event raises, updating the wallet's outflow window.
pub fn detect(rules: &FraudRules, window: &mut OutflowWindow, e: &RecordedEvent) -> Vec<Flag> {
    let Some(amount) = outflow(&e.event) else {
        return Vec::new();
    };
    let t = e.recorded_at;
    let mut flags = Vec::new();
    let flag = |rule: &str, reason: String, event_ids: Vec<Uuid>| Flag {
        rule: rule.to_owned(),
        reason,
        wallet_id: e.stream.to_string(),
        event_ids,
        flagged_at: t,
        position: e.position,
    };

    let mut in_window: Vec<Uuid> = window
        .recent
        .iter()
        .filter(|(at, _)| *at >= t - rules.rapid_window && *at <= t)
        .map(|(_, id)| *id)
        .collect();
    in_window.push(e.event_id);
    if in_window.len() as u32 >= rules.rapid_count {
        let reason = format!(
            "{} outflows within {} s",
            in_window.len(),
            rules.rapid_window.num_milliseconds() as f64 / 1000.0
        );
        flags.push(flag(RAPID_OUTFLOWS, reason, in_window));
    }
    if amount >= rules.large_amount {
        let reason = format!("single outflow of {:.4} (threshold {})", amount, rules.large_amount);
        flags.push(flag(LARGE_OUTFLOW, reason, vec![e.event_id]));
    }

    // Only the last `rapid_count - 1` outflows can matter for the next one.
    let keep = rules.rapid_count.saturating_sub(1) as usize;
    window.recent.push((t, e.event_id));
    if window.recent.len() > keep {
        let excess = window.recent.len() - keep;
        window.recent.drain(..excess);
    }
    flags
}

/// Key of the flag `rule` raised at `position`: unique, and in the order
/// pages list flags of one position (`GET /flags` cursors name it).
pub fn flag_key(position: Position, rule: &str) -> String {
    format!("f/{position:020}/{rule}")
}

pub fn window_key(wallet: &str) -> String {
    format!("w/{wallet}")
}

pub fn load_window(batch: &Batch, key: &str) -> OutflowWindow {
    batch
        .get(key)
        .and_then(|d| serde_json::from_str(&d.body).ok())
        .unwrap_or_default()
}

pub fn window_doc(key: String, wallet: &str, window: &OutflowWindow) -> Doc {
    Doc {
        key,
        kind: WINDOW_KIND.to_owned(),
        wallet_id: wallet.to_owned(),
        sort: 0,
        tag: None,
        body: serde_json::to_string(window).expect("windows serialise"),
    }
}

pub struct Flags {
    pub rules: FraudRules,
}

impl Projection for Flags {
    fn name(&self) -> &'static str {
        NAME
    }

    fn reads(&self, e: &RecordedEvent) -> Vec<String> {
        match outflow(&e.event) {
            Some(_) => vec![window_key(e.stream.as_str())],
            None => Vec::new(),
        }
    }

    fn apply(&self, e: &RecordedEvent, batch: &mut Batch) {
        if outflow(&e.event).is_none() {
            return;
        }
        let wallet = e.stream.as_str();
        let key = window_key(wallet);
        let mut window = load_window(batch, &key);
        for flag in detect(&self.rules, &mut window, e) {
            batch.put(Doc {
                key: flag_key(flag.position, &flag.rule),
                kind: FLAG_KIND.to_owned(),
                wallet_id: flag.wallet_id.clone(),
                sort: flag.position,
                tag: Some(flag.rule.clone()),
                body: serde_json::to_string(&flag).expect("flags serialise"),
            });
        }
        batch.put(window_doc(key, wallet, &window));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::{Amount, Balance, WalletId};

    fn outflow_at(ms: i64, amount: &str, position: i64) -> RecordedEvent {
        let w = WalletId::parse("w").unwrap();
        let amount = Amount::parse(amount).unwrap();
        RecordedEvent {
            position,
            stream: w.clone(),
            version: position as u64,
            event_id: Uuid::from_u128(position as u128),
            schema_version: 1,
            event: WalletEvent::FundsWithdrawn(crate::aggregate::FundsPayload {
                wallet_id: w,
                amount,
                new_balance: Balance::ZERO,
            }),
            metadata: serde_json::json!({}),
            recorded_at: DateTime::from_timestamp_millis(1_700_000_000_000 + ms).unwrap(),
            hash: String::new(),
        }
    }

    fn rules_fired(times_ms: &[i64], amount: &str) -> Vec<Vec<String>> {
        let rules = FraudRules::default();
        let mut window = OutflowWindow::default();
        times_ms
            .iter()
            .enumerate()
            .map(|(i, t)| {
                detect(&rules, &mut window, &outflow_at(*t, amount, i as i64 + 1))
                    .into_iter()
                    .map(|f| f.rule)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn two_outflows_in_a_minute_are_fine_three_are_flagged() {
        assert_eq!(rules_fired(&[0, 1_000], "1"), vec![Vec::<String>::new(), vec![]]);
        let fired = rules_fired(&[0, 1_000, 2_000], "1");
        assert_eq!(fired[2], vec![RAPID_OUTFLOWS.to_owned()]);
    }

    #[test]
    fn the_window_is_sixty_seconds_inclusive_on_both_sides() {
        assert_eq!(
            rules_fired(&[0, 30_000, 59_999], "1")[2],
            vec![RAPID_OUTFLOWS.to_owned()]
        );
        assert_eq!(
            rules_fired(&[0, 30_000, 60_000], "1")[2],
            vec![RAPID_OUTFLOWS.to_owned()]
        );
        assert!(rules_fired(&[0, 30_000, 60_001], "1")[2].is_empty());
        // Sliding: the 4th outflow counts only those still inside its window.
        let fired = rules_fired(&[0, 10_000, 70_001, 80_000], "1");
        assert!(fired[2].is_empty(), "{fired:?}");
        assert!(fired[3].is_empty(), "only 2 outflows within [20 s, 80 s]: {fired:?}");
    }

    #[test]
    fn a_fourth_quick_outflow_names_the_last_three() {
        let rules = FraudRules::default();
        let mut window = OutflowWindow::default();
        let mut flags = Vec::new();
        for (i, t) in [0, 1_000, 2_000, 3_000].into_iter().enumerate() {
            flags = detect(&rules, &mut window, &outflow_at(t, "1", i as i64 + 1));
        }
        assert_eq!(flags.len(), 1, "{flags:?}");
        let ids: Vec<Uuid> = (2..=4).map(Uuid::from_u128).collect();
        assert_eq!(
            flags[0].event_ids, ids,
            "as DESIGN.md says: the window's last rapid_count outflows"
        );
    }

    #[test]
    fn large_outflow_threshold_is_inclusive() {
        assert!(rules_fired(&[0], "9999.9999")[0].is_empty());
        assert_eq!(rules_fired(&[0], "10000")[0], vec![LARGE_OUTFLOW.to_owned()]);
    }

    #[test]
    fn a_flag_names_every_event_that_triggered_it() {
        let rules = FraudRules::default();
        let mut window = OutflowWindow::default();
        let mut last = Vec::new();
        for (i, t) in [0, 1_000, 2_000].into_iter().enumerate() {
            last = detect(&rules, &mut window, &outflow_at(t, "1", i as i64 + 1));
        }
        let ids: Vec<Uuid> = (1..=3).map(|i| Uuid::from_u128(i)).collect();
        assert_eq!(last[0].event_ids, ids);
        assert_eq!(last[0].position, 3);
        assert_eq!(
            last[0].flagged_at,
            DateTime::from_timestamp_millis(1_700_000_002_000).unwrap()
        );
    }
}
