//! The event store on both backends: appends, version checks, atomicity,
//! reads by stream and by position, and the late-commit guarantee.

mod common;

use std::time::Duration;

use common::TestDb;
use serde_json::json;
use uuid::Uuid;
use wallet::aggregate::{decide, Amount, Command, Wallet, WalletEvent, WalletId};
use wallet::store::{
    AppendError, AppendOutcome, AppendRequest, Cutoff, Head, IdempotencyRecord, NewEvent, StreamAppend,
};

fn id(s: &str) -> WalletId {
    WalletId::parse(s).unwrap()
}

/// The append a deposit of `amount` into `wallet` (currently `state`) makes.
fn deposit(state: &Wallet, amount: &str) -> StreamAppend {
    let cmd = Command::Deposit {
        wallet: state.id.clone(),
        amount: Amount::parse(amount).unwrap(),
    };
    let d = decide(&cmd, &[state]).unwrap().streams.remove(0);
    to_append(d.wallet, Head::of(state), d.events)
}

fn to_append(stream: WalletId, expected: Head, events: Vec<WalletEvent>) -> StreamAppend {
    StreamAppend {
        stream,
        expected,
        events: events
            .into_iter()
            .map(|event| NewEvent {
                event_id: Uuid::now_v7(),
                event,
                metadata: json!({"test": true}),
            })
            .collect(),
        on_batch: false,
    }
}

fn single(s: StreamAppend) -> AppendRequest {
    AppendRequest {
        streams: vec![s],
        idempotency: Vec::new(),
    }
}

async fn fold(db: &TestDb, w: &str) -> Wallet {
    let events = db.store.read_stream(&id(w), 0, None).await.unwrap();
    Wallet::fold(id(w), events.iter().map(|e| &e.event))
}

async fn append_and_read_back(db: TestDb) {
    let a = Wallet::empty(id("a"));
    let recorded = db.store.append(single(deposit(&a, "10.5"))).await.unwrap();
    assert_eq!(recorded.len(), 2, "WalletCreated + FundsDeposited");
    assert_eq!(recorded.iter().map(|e| e.version).collect::<Vec<_>>(), vec![1, 2]);
    assert!(recorded[0].position < recorded[1].position);

    let stream = db.store.read_stream(&id("a"), 0, None).await.unwrap();
    assert_eq!(stream, recorded, "what was appended is what is read");
    let tail = db.store.read_stream(&id("a"), 1, None).await.unwrap();
    assert_eq!(tail, recorded[1..]);

    let a = fold(&db, "a").await;
    assert_eq!((a.version, a.balance.to_string().as_str()), (2, "10.5000"));
    db.store.append(single(deposit(&a, "1"))).await.unwrap();

    let all = db.store.read_all(0, 100).await.unwrap();
    assert_eq!(all.len(), 3);
    assert!(all.windows(2).all(|w| w[0].position < w[1].position));
    assert_eq!(db.store.read_all(all[0].position, 1).await.unwrap(), all[1..2]);
    assert_eq!(db.store.head_position().await.unwrap(), all[2].position);

    let back = db.store.read_stream_backwards(&id("a"), None, 2).await.unwrap();
    assert_eq!(back.iter().map(|e| e.version).collect::<Vec<_>>(), vec![3, 2]);
    let back = db.store.read_stream_backwards(&id("a"), Some(2), 10).await.unwrap();
    assert_eq!(back.iter().map(|e| e.version).collect::<Vec<_>>(), vec![1]);

    // Time travel by position: as of the second event.
    let then = db
        .store
        .read_stream(&id("a"), 0, Some(Cutoff::Position(all[1].position)))
        .await
        .unwrap();
    assert_eq!(then.len(), 2);
    let then = db
        .store
        .read_stream(&id("a"), 0, Some(Cutoff::Time(all[0].recorded_at)))
        .await
        .unwrap();
    assert!(!then.is_empty() && then.iter().all(|e| e.recorded_at <= all[0].recorded_at));
}

async fn stale_expected_version_is_a_conflict(db: TestDb) {
    let empty = Wallet::empty(id("a"));
    db.store.append(single(deposit(&empty, "5"))).await.unwrap();
    // A second writer decided against the same (now stale) empty state.
    let err = db.store.append(single(deposit(&empty, "7"))).await.unwrap_err();
    assert!(
        matches!(
            err,
            AppendError::Conflict {
                expected: Head { version: 0, .. },
                actual: Head { version: 2, .. },
                ..
            }
        ),
        "{err:?}"
    );
    // An expected version ahead of the stream is a conflict too, not a gap.
    let mut ahead = deposit(&fold(&db, "a").await, "1");
    ahead.expected.version = 9;
    assert!(matches!(
        db.store.append(single(ahead)).await,
        Err(AppendError::Conflict { .. })
    ));
    let a = fold(&db, "a").await;
    assert_eq!((a.version, a.balance.to_string().as_str()), (2, "5.0000"));
}

async fn a_failed_transfer_changes_neither_stream(db: TestDb) {
    db.store
        .append(single(deposit(&Wallet::empty(id("a")), "10")))
        .await
        .unwrap();
    db.store
        .append(single(deposit(&Wallet::empty(id("b")), "10")))
        .await
        .unwrap();
    let (a, b) = (fold(&db, "a").await, fold(&db, "b").await);
    let cmd = Command::Transfer {
        from: id("a"),
        to: id("b"),
        amount: Amount::parse("3").unwrap(),
        transfer_id: Uuid::now_v7(),
    };
    let decision = decide(&cmd, &[&a, &b]).unwrap();
    let heads = [Head::of(&a), Head::of(&b)];
    // Someone moves b first.
    db.store.append(single(deposit(&b, "1"))).await.unwrap();
    let head = db.store.head_position().await.unwrap();

    let streams = decision
        .streams
        .into_iter()
        .zip(heads)
        .map(|(s, head)| to_append(s.wallet, head, s.events))
        .collect();
    let err = db
        .store
        .append(AppendRequest {
            streams,
            idempotency: Vec::new(),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&err, AppendError::Conflict { stream, .. } if stream.as_str() == "b"),
        "{err:?}"
    );
    assert_eq!(db.store.head_position().await.unwrap(), head, "nothing was written");
    assert_eq!(fold(&db, "a").await, a, "source untouched");
    assert_eq!(fold(&db, "b").await.balance.to_string(), "11.0000");
}

async fn an_idempotency_key_commits_with_its_events_exactly_once(db: TestDb) {
    let record = |fp: &str| IdempotencyRecord {
        wallet: id("a"),
        key: "k1".into(),
        fingerprint: fp.into(),
        outcome: json!({"receipt": {}}),
    };
    let first = AppendRequest {
        streams: vec![deposit(&Wallet::empty(id("a")), "5")],
        idempotency: vec![record("deposit:5")],
    };
    let recorded = db.store.append(first).await.unwrap();
    let found = db.store.find_idempotency(&id("a"), "k1").await.unwrap().unwrap();
    assert_eq!(found.fingerprint, "deposit:5");
    assert_eq!(found.position, Some(recorded.last().unwrap().position));

    let head = db.store.head_position().await.unwrap();
    let again = AppendRequest {
        streams: vec![deposit(&fold(&db, "a").await, "5")],
        idempotency: vec![record("deposit:5")],
    };
    assert!(matches!(
        db.store.append(again).await,
        Err(AppendError::DuplicateRequest)
    ));
    assert_eq!(
        db.store.head_position().await.unwrap(),
        head,
        "the duplicate wrote no events"
    );
    // A recorded key wins over a stale head: the stored answer is the truth.
    let stale = AppendRequest {
        streams: vec![deposit(&Wallet::empty(id("a")), "5")],
        idempotency: vec![record("deposit:5")],
    };
    assert!(matches!(
        db.store.append(stale).await,
        Err(AppendError::DuplicateRequest)
    ));
    let rejection = AppendRequest {
        streams: Vec::new(),
        idempotency: vec![record("x")],
    };
    assert!(matches!(
        db.store.append(rejection).await,
        Err(AppendError::DuplicateRequest)
    ));
    // Keys are scoped to the wallet.
    assert!(db.store.find_idempotency(&id("b"), "k1").await.unwrap().is_none());
}

/// A batch larger than one SQLite statement takes (32,766 bound values,
/// 9 per event row) is appended whole, in request order, on both backends.
async fn a_batch_beyond_one_statement_appends_whole(db: TestDb) {
    let requests: Vec<AppendRequest> = (0..2_000)
        .map(|i| single(deposit(&Wallet::empty(id(&format!("big{i}"))), "1")))
        .collect();
    let outcomes = db.store.append_batch(requests).await.unwrap();
    let mut positions = Vec::new();
    for outcome in &outcomes {
        match outcome {
            AppendOutcome::Appended(recorded) => positions.extend(recorded.iter().map(|e| e.position)),
            other => panic!("not appended: {other:?}"),
        }
    }
    assert_eq!(outcomes.len(), 2_000);
    assert!(positions.len() > 3_641, "more rows than one statement binds");
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "in request order");
    assert_eq!(db.store.head_position().await.unwrap(), *positions.last().unwrap());
    assert_eq!(fold(&db, "big1999").await.balance.to_string(), "1.0000");
}

/// A request may record several keys (an atomic batch's own and its
/// operations'): all are recorded with its events, and one of them already
/// recorded makes the whole request a duplicate that writes nothing.
async fn a_request_records_all_its_keys_or_none(db: TestDb) {
    let record = |wallet: &str, key: &str| IdempotencyRecord {
        wallet: id(wallet),
        key: key.into(),
        fingerprint: format!("fp-{key}"),
        outcome: json!({"receipt": {}}),
    };
    let first = AppendRequest {
        streams: vec![deposit(&Wallet::empty(id("a")), "5")],
        idempotency: vec![record("a", "k1"), record("b", "k2")],
    };
    let recorded = db.store.append(first).await.unwrap();
    for (wallet, key) in [("a", "k1"), ("b", "k2")] {
        let found = db.store.find_idempotency(&id(wallet), key).await.unwrap();
        assert_eq!(
            found.map(|f| f.position),
            Some(recorded.last().map(|e| e.position)),
            "{wallet}/{key}"
        );
    }
    let head = db.store.head_position().await.unwrap();
    let overlapping = AppendRequest {
        streams: vec![deposit(&fold(&db, "a").await, "5")],
        idempotency: vec![record("a", "k3"), record("b", "k2")],
    };
    assert!(matches!(
        db.store.append(overlapping).await,
        Err(AppendError::DuplicateRequest)
    ));
    assert_eq!(db.store.head_position().await.unwrap(), head, "nothing written");
    assert!(
        db.store.find_idempotency(&id("a"), "k3").await.unwrap().is_none(),
        "no key of a duplicate is recorded"
    );
}

/// One append's transaction is held open while others try to commit: a
/// reader following the log by position must never pass over the held one.
async fn a_reader_never_skips_a_late_commit(db: TestDb) {
    let held = db
        .store
        .begin_append(single(deposit(&Wallet::empty(id("held")), "1")))
        .await
        .unwrap();

    let mut writers = Vec::new();
    for i in 0..5 {
        let store = db.store.clone();
        writers.push(tokio::spawn(async move {
            let w = Wallet::empty(id(&format!("later{i}")));
            store.append(single(deposit(&w, "2"))).await.unwrap()
        }));
    }

    // Follow the log while the held append is open.
    let mut checkpoint = 0;
    let mut seen = Vec::new();
    for _ in 0..20 {
        for e in db.store.read_all(checkpoint, 100).await.unwrap() {
            checkpoint = e.position;
            seen.push(e);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(seen.is_empty(), "nothing may be readable past an open append: {seen:?}");

    let held = held.commit().await.unwrap();
    for w in writers {
        w.await.unwrap();
    }
    for e in db.store.read_all(checkpoint, 1000).await.unwrap() {
        seen.push(e);
    }
    let all = db.store.read_all(0, 1000).await.unwrap();
    assert_eq!(all.len(), 12, "6 wallets x (WalletCreated + FundsDeposited)");
    assert_eq!(seen, all, "the reader saw every event, in position order");
    assert_eq!(
        all[0].event_id, held[0].event_id,
        "the held append took the first positions"
    );
}

async fn events_cannot_be_updated_or_deleted(db: TestDb) {
    db.store
        .append(single(deposit(&Wallet::empty(id("a")), "5")))
        .await
        .unwrap();
    let update = "UPDATE events SET event_type = 'x'";
    let delete = "DELETE FROM events";
    if db.url.starts_with("postgres") {
        let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
        assert!(sqlx::query(update).execute(&pool).await.is_err());
        assert!(sqlx::query(delete).execute(&pool).await.is_err());
    } else {
        let pool = sqlx::SqlitePool::connect(&db.url).await.unwrap();
        assert!(sqlx::query(update).execute(&pool).await.is_err());
        assert!(sqlx::query(delete).execute(&pool).await.is_err());
    }
    assert_eq!(db.store.read_all(0, 10).await.unwrap().len(), 2);
}

/// The database checks a stream's whole head, not only its version: an
/// append decided on a wrong balance at the right version is refused,
/// nothing is written, and the conflict answers with the actual head.
async fn a_wrong_balance_at_the_right_version_is_refused(db: TestDb) {
    let empty = Wallet::empty(id("a"));
    db.store.append(single(deposit(&empty, "5"))).await.unwrap();
    let at2 = fold(&db, "a").await;
    let planted = Wallet {
        balance: at2.balance.checked_add(Amount::parse("1000").unwrap()).unwrap(),
        ..at2.clone()
    };
    let head = db.store.head_position().await.unwrap();
    // A withdrawal the planted balance would allow, the real one not.
    let cmd = Command::Withdraw {
        wallet: id("a"),
        amount: Amount::parse("500").unwrap(),
    };
    let d = decide(&cmd, &[&planted]).unwrap().streams.remove(0);
    let err = db
        .store
        .append(single(to_append(d.wallet, Head::of(&planted), d.events)))
        .await
        .unwrap_err();
    match err {
        AppendError::Conflict {
            stream,
            expected,
            actual,
        } => {
            assert_eq!(stream, id("a"));
            assert_eq!(expected, Head::of(&planted));
            assert_eq!(actual, Head::of(&at2), "the conflict carries the log's head");
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(db.store.head_position().await.unwrap(), head, "nothing was written");
    assert_eq!(fold(&db, "a").await, at2);

    // A head assertion with no events (how a rejection is guarded) is
    // refused the same way, and its key is not recorded.
    let record = IdempotencyRecord {
        wallet: id("a"),
        key: "r1".into(),
        fingerprint: "withdraw:500".into(),
        outcome: json!({"rejected": {}}),
    };
    let assertion = |head| AppendRequest {
        streams: vec![StreamAppend {
            stream: id("a"),
            expected: head,
            events: Vec::new(),
            on_batch: false,
        }],
        idempotency: vec![record.clone()],
    };
    assert!(matches!(
        db.store.append(assertion(Head::of(&planted))).await,
        Err(AppendError::Conflict { .. })
    ));
    assert!(db.store.find_idempotency(&id("a"), "r1").await.unwrap().is_none());
    assert_eq!(db.store.append(assertion(Head::of(&at2))).await.unwrap(), vec![]);
    assert!(db.store.find_idempotency(&id("a"), "r1").await.unwrap().is_some());
}

/// A batch is one transaction, but each request is checked on its own
/// against the heads the batch's earlier requests leave: a conflict fails
/// that request (and whatever was decided on top of it), never the batch.
async fn a_batch_guards_each_request_against_its_predecessors(db: TestDb) {
    db.store
        .append(single(deposit(&Wallet::empty(id("a")), "5")))
        .await
        .unwrap();
    for first_fails in [false, true] {
        let other = fold(&db, "b").await;
        let now = fold(&db, "a").await;
        let mut first = deposit(&now, "10");
        if first_fails {
            first.expected.version = 1;
        }
        let after_first = first.events.iter().fold(now.clone(), |w, e| w.evolve(&e.event));
        let second = deposit(&after_first, "20");
        let outcomes = db
            .store
            .append_batch(vec![single(first), single(deposit(&other, "3")), single(second)])
            .await
            .unwrap();
        assert!(
            matches!(outcomes[1], AppendOutcome::Appended(_)),
            "an unrelated append commits"
        );
        if first_fails {
            let actual = vec![(id("a"), Head::of(&now))];
            assert_eq!(outcomes[0], AppendOutcome::Conflict(actual.clone()));
            assert_eq!(
                outcomes[2],
                AppendOutcome::Conflict(actual),
                "decided on a state that never was"
            );
        } else {
            assert!(
                outcomes.iter().all(|o| matches!(o, AppendOutcome::Appended(_))),
                "{outcomes:?}"
            );
        }
        assert_eq!(
            fold(&db, "b").await.balance,
            other.balance.checked_add(Amount::parse("3").unwrap()).unwrap()
        );
        let expected = if first_fails {
            now.balance
        } else {
            after_first.balance.checked_add(Amount::parse("20").unwrap()).unwrap()
        };
        assert_eq!(fold(&db, "a").await.balance, expected);
    }
}

/// The head cannot always tell a state that never was: another writer's
/// hold leaves the same version and balance as this batch's failed one. A
/// request decided on this batch's state (`on_batch`) is refused unless the
/// batch moved its stream.
async fn a_decision_on_a_failed_request_is_refused_even_at_a_matching_head(db: TestDb) {
    db.store
        .append(single(deposit(&Wallet::empty(id("a")), "50")))
        .await
        .unwrap();
    let ours = fold(&db, "a").await;
    let hold = |state: &Wallet, n: u128| {
        let cmd = Command::PlaceHold {
            wallet: id("a"),
            hold_id: Uuid::from_u128(n),
            amount: Amount::parse("40").unwrap(),
            expires_at: chrono::Utc::now() + chrono::TimeDelta::hours(1),
            to: None,
        };
        let d = decide(&cmd, &[state]).unwrap().streams.remove(0);
        to_append(d.wallet, Head::of(state), d.events)
    };
    // Another writer holds 40 first: same version and balance as our hold.
    db.store.append(single(hold(&ours, 1))).await.unwrap();
    // Our batch: a hold decided on the stale state (conflicts), and a
    // withdrawal of 10 decided on top of it, whose expected head matches
    // the log's by accident. With both holds only 10 is available to it;
    // on the log's state (one hold) 10 fits as well, so the guard, not the
    // arithmetic, must refuse it.
    let ours_held = hold(&ours, 2)
        .events
        .iter()
        .fold(ours.clone(), |w, e| w.evolve(&e.event));
    let withdraw = Command::Withdraw {
        wallet: id("a"),
        amount: Amount::parse("10").unwrap(),
    };
    let d = decide(&withdraw, &[&ours_held]).unwrap().streams.remove(0);
    let mut second = to_append(d.wallet, Head::of(&ours_held), d.events);
    second.on_batch = true;
    let outcomes = db
        .store
        .append_batch(vec![single(hold(&ours, 2)), single(second.clone())])
        .await
        .unwrap();
    let actual = vec![(id("a"), Head::of(&fold(&db, "a").await))];
    assert_eq!(outcomes[0], AppendOutcome::Conflict(actual.clone()));
    assert_eq!(
        outcomes[1],
        AppendOutcome::Conflict(actual),
        "decided on a hold that never was"
    );
    // Without the flag the same head would have been taken as the truth.
    second.on_batch = false;
    assert!(matches!(
        db.store.append_batch(vec![single(second)]).await.unwrap()[0],
        AppendOutcome::Appended(_)
    ));
}

/// Readers by position rely on positions becoming visible in order; a
/// sequence cache above 1 breaks that, and `migrate` refuses to run on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_refuses_a_position_sequence_with_a_cache() {
    let db = common::postgres().await;
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    sqlx::query("ALTER TABLE events ALTER COLUMN position SET CACHE 20")
        .execute(&pool)
        .await
        .unwrap();
    let err = db.store.migrate().await.expect_err("a cached sequence is refused");
    assert!(err.to_string().contains("cache"), "{err}");
    sqlx::query("ALTER TABLE events ALTER COLUMN position SET CACHE 1")
        .execute(&pool)
        .await
        .unwrap();
    db.store.migrate().await.expect("cache 1 is fine");
}

on_both_backends!(
    a_batch_beyond_one_statement_appends_whole,
    a_request_records_all_its_keys_or_none,
    append_and_read_back,
    stale_expected_version_is_a_conflict,
    a_wrong_balance_at_the_right_version_is_refused,
    a_batch_guards_each_request_against_its_predecessors,
    a_decision_on_a_failed_request_is_refused_even_at_a_matching_head,
    a_failed_transfer_changes_neither_stream,
    an_idempotency_key_commits_with_its_events_exactly_once,
    a_reader_never_skips_a_late_commit,
    events_cannot_be_updated_or_deleted,
);
