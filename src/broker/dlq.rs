//! The dead-letter queue from the command line: list what is in it (with
//! each message's reason), replay messages back through the worker, or
//! discard named ones that can never apply.
//!
//! Neither declares anything: a queue that does not exist (a mistyped
//! `AMQP_EXCHANGE`) is an error naming it, never a new empty queue.
//!
//! Listing takes messages without acknowledging them and hands them all
//! back at the end, so it changes nothing. Replaying publishes a message to
//! the worker's queue (confirmed) before acknowledging it in the DLQ, so a
//! crash in between duplicates it at worst, and the worker skips duplicates.

use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable};
use lapin::Channel;
use serde::Serialize;

use super::{connect, BrokerError, EventMessage, Topology, REASON_HEADER, REPLAY_HEADER};

/// Largest number of messages one `list` or `replay` handles.
pub const MAX_BATCH: usize = 10_000;

/// One dead letter, as `dlq list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    pub message_id: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub position: Option<i64>,
    pub wallet_id: Option<String>,
    pub reason: Option<String>,
    pub failed_at: Option<String>,
    pub bytes: usize,
}

fn header(message: &BasicGetMessage, name: &str) -> Option<String> {
    let headers: &FieldTable = message.delivery.properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        other => Some(format!("{other:?}")),
    }
}

fn describe(message: &BasicGetMessage) -> DeadLetter {
    let address = EventMessage::address(&message.delivery.data);
    DeadLetter {
        message_id: message
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned()),
        kind: message
            .delivery
            .properties
            .kind()
            .as_ref()
            .map(|s| s.as_str().to_owned()),
        position: address.as_ref().map(|a| a.position),
        wallet_id: address.map(|a| a.wallet_id),
        reason: header(message, REASON_HEADER),
        failed_at: header(message, "x-wallet-failed-at"),
        bytes: message.delivery.data.len(),
    }
}

/// Takes every message in the DLQ right now (at most `limit`), unacknowledged.
async fn take(channel: &Channel, topology: &Topology, limit: usize) -> Result<Vec<BasicGetMessage>, BrokerError> {
    let limit = limit.min(MAX_BATCH);
    let mut taken = Vec::new();
    // Bounded by the depth seen at the first get: messages that arrive
    // meanwhile (a replay failing again) wait for the next run.
    let mut remaining = usize::MAX;
    while taken.len() < limit && remaining > 0 {
        match channel
            .basic_get(&topology.dead_letter_queue, BasicGetOptions { no_ack: false })
            .await?
        {
            Some(message) => {
                if remaining == usize::MAX {
                    remaining = message.message_count as usize + 1;
                }
                remaining -= 1;
                taken.push(message);
            }
            None => break,
        }
    }
    Ok(taken)
}

/// Hands back every taken message not acknowledged yet, in order; `last`
/// is the highest unacknowledged delivery tag (naming an acknowledged one
/// would be a channel error).
async fn give_back(channel: &Channel, last: Option<u64>) -> Result<(), BrokerError> {
    if let Some(last) = last {
        channel
            .basic_nack(
                last,
                BasicNackOptions {
                    multiple: true,
                    requeue: true,
                },
            )
            .await?;
    }
    Ok(())
}

/// The dead letters, oldest first, at most `limit`.
pub async fn list(url: &str, topology: &Topology, limit: usize) -> Result<Vec<DeadLetter>, BrokerError> {
    let connection = connect(url).await?;
    let channel = connection.create_channel().await?;
    topology.require(&channel, &topology.dead_letter_queue).await?;
    let taken = take(&channel, topology, limit).await?;
    let letters = taken.iter().map(describe).collect();
    give_back(&channel, taken.last().map(|m| m.delivery.delivery_tag)).await?;
    let _ = connection.close(200, "dlq listed").await;
    Ok(letters)
}

/// Puts dead letters back on the worker's queue, oldest first: all of them,
/// or those whose message id is in `ids`. Returns the replayed ones.
pub async fn replay(
    url: &str,
    topology: &Topology,
    ids: &[String],
    limit: usize,
) -> Result<Vec<DeadLetter>, BrokerError> {
    let connection = connect(url).await?;
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    topology.require(&channel, &topology.dead_letter_queue).await?;
    topology.require(&channel, &topology.worker_queue).await?;
    let taken = take(&channel, topology, MAX_BATCH).await?;
    let mut replayed = Vec::new();
    let mut last_kept = None;
    for message in &taken {
        let letter = describe(message);
        let wanted = ids.is_empty() || letter.message_id.as_ref().is_some_and(|id| ids.contains(id));
        if !wanted || replayed.len() >= limit {
            last_kept = Some(message.delivery.delivery_tag);
            continue;
        }
        let mut headers = message.delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(REPLAY_HEADER.into(), AMQPValue::Boolean(true));
        let properties = message.delivery.properties.clone().with_headers(headers);
        // Straight to the worker's queue (default exchange): other
        // subscribers of the fanout got this event already.
        let confirm = channel
            .basic_publish(
                "",
                &topology.worker_queue,
                BasicPublishOptions::default(),
                &message.delivery.data,
                properties,
            )
            .await?
            .await?;
        if let Confirmation::Nack(_) = confirm {
            last_kept = taken.last().map(|m| m.delivery.delivery_tag);
            break;
        }
        channel
            .basic_ack(message.delivery.delivery_tag, BasicAckOptions { multiple: false })
            .await?;
        replayed.push(letter);
    }
    give_back(&channel, last_kept).await?;
    let _ = connection.close(200, "dlq replayed").await;
    Ok(replayed)
}

/// Removes the dead letters whose message id is in `ids` for good (ones
/// that can never apply, e.g. a forged or garbage message), after the
/// operator has seen them in `dlq list`. Never all of them: `ids` is
/// required. Returns the discarded ones; the rest stay, in order.
pub async fn discard(url: &str, topology: &Topology, ids: &[String]) -> Result<Vec<DeadLetter>, BrokerError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let connection = connect(url).await?;
    let channel = connection.create_channel().await?;
    topology.require(&channel, &topology.dead_letter_queue).await?;
    let taken = take(&channel, topology, MAX_BATCH).await?;
    let mut discarded = Vec::new();
    let mut last_kept = None;
    for message in &taken {
        let letter = describe(message);
        if letter.message_id.as_ref().is_some_and(|id| ids.contains(id)) {
            channel
                .basic_ack(message.delivery.delivery_tag, BasicAckOptions { multiple: false })
                .await?;
            discarded.push(letter);
        } else {
            last_kept = Some(message.delivery.delivery_tag);
        }
    }
    give_back(&channel, last_kept).await?;
    let _ = connection.close(200, "dlq discarded").await;
    Ok(discarded)
}
