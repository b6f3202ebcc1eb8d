//! Holds and limits over HTTP, on both backends: the lifecycle a card or
//! ride flow uses (authorise, capture part, release the rest), expiry by the
//! service itself, limits, and races between captures, voids, expiry and
//! withdrawals; batches, atomic and independent. Every case ends with `verify` over the whole log, which also
//! compares each read model with a rebuild from the log.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::TestDb;
use reqwest::{Client, Response, StatusCode};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use wallet::aggregate::{Wallet, WalletEvent, WalletId};
use wallet::projections::{FraudRules, Projections};
use wallet::store::EventStore;

struct Api {
    base: String,
    /// A second server on the same database (another process), for races.
    other: Option<String>,
    http: Client,
    store: EventStore,
    _db: common::Cleanup,
}

impl Api {
    async fn start(db: TestDb) -> Self {
        Self {
            base: common::serve(db.store.clone()).await,
            other: None,
            http: Client::new(),
            store: db.store,
            _db: db.cleanup,
        }
    }
    /// Two servers on one database: two processes deciding the same wallets.
    async fn start_two(db: TestDb) -> Self {
        let mut api = Self::start(db).await;
        api.other = Some(common::serve(api.store.clone()).await);
        api
    }
    /// POSTs through the first server, or the second one for odd `i`;
    /// returns the status and the body.
    async fn post_via(&self, i: usize, path: &str, body: Value) -> (StatusCode, Value) {
        let base = match (&self.other, i % 2) {
            (Some(other), 1) => other,
            _ => &self.base,
        };
        let r = self
            .http
            .post(format!("{base}{path}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status(), r.json().await.unwrap_or(Value::Null))
    }
    async fn send(&self, method: reqwest::Method, path: &str, body: Value) -> Response {
        self.http
            .request(method, format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap()
    }
    async fn post(&self, path: &str, body: Value) -> Response {
        self.send(reqwest::Method::POST, path, body).await
    }
    /// POSTs and expects `status`; returns the body.
    async fn expect(&self, path: &str, body: Value, status: StatusCode) -> Value {
        let r = self.post(path, body.clone()).await;
        let got = r.status();
        let text = r.text().await.unwrap();
        assert_eq!(got, status, "POST {path} {body}: {text}");
        serde_json::from_str(&text).unwrap()
    }
    async fn get(&self, path: &str) -> Value {
        let r = self.http.get(format!("{}{path}", self.base)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "GET {path}");
        r.json().await.unwrap()
    }
    async fn wallet(&self, id: &str) -> Value {
        self.get(&format!("/wallet/{id}")).await
    }
    async fn hold(&self, wallet: &str, body: Value) -> String {
        let r = self
            .expect(&format!("/wallet/{wallet}/holds"), body, StatusCode::CREATED)
            .await;
        assert_eq!(r["status"], "held");
        r["holdId"].as_str().unwrap().to_owned()
    }
    /// Whole-log verification, read models included: nothing may be found.
    async fn verify(&self) {
        let projections = Projections::new(self.store.clone(), FraudRules::default());
        let report = wallet::verify::verify(&self.store, &projections, |_, _| {})
            .await
            .unwrap();
        assert!(report.discrepancies.is_empty(), "verify: {:?}", report.discrepancies);
    }
}

fn code(v: &Value) -> &str {
    v["code"].as_str().unwrap_or("")
}

async fn lifecycle(db: TestDb) {
    let api = Api::start(db).await;
    api.expect("/wallet/rider/deposit", json!({"amount": 100}), StatusCode::CREATED)
        .await;
    let hold = api
        .hold(
            "rider",
            json!({"amount": "40", "toWalletId": "driver", "requestId": "h1"}),
        )
        .await;
    let w = api.wallet("rider").await;
    assert_eq!(
        (w["balance"].as_str(), w["available"].as_str(), w["held"].as_str()),
        (Some("100.0000"), Some("60.0000"), Some("40.0000"))
    );

    let e = api
        .expect(
            "/wallet/rider/withdraw",
            json!({"amount": "60.0001"}),
            StatusCode::BAD_REQUEST,
        )
        .await;
    assert_eq!(code(&e), "INSUFFICIENT_FUNDS", "held money cannot be withdrawn");
    let e = api
        .expect(
            "/wallet/rider/transfer",
            json!({"toWalletId": "x", "amount": 61}),
            StatusCode::BAD_REQUEST,
        )
        .await;
    assert_eq!(code(&e), "INSUFFICIENT_FUNDS");

    let capture = format!("/wallet/rider/holds/{hold}/capture");
    let r = api
        .expect(
            &capture,
            json!({"amount": "25", "requestId": "c1"}),
            StatusCode::CREATED,
        )
        .await;
    assert_eq!(
        (r["status"].as_str(), r["captured"].as_str(), r["released"].as_str()),
        (Some("captured"), Some("25.0000"), Some("15.0000"))
    );
    assert_eq!(
        (r["balance"].as_str(), r["available"].as_str(), r["toBalance"].as_str()),
        (Some("75.0000"), Some("75.0000"), Some("25.0000"))
    );
    assert_eq!(
        api.wallet("driver").await["balance"],
        "25.0000",
        "paid into the hold's payee"
    );

    // The same capture again replays; any other resolution is refused.
    let again = api.post(&capture, json!({"amount": "25", "requestId": "c1"})).await;
    assert_eq!(again.status(), StatusCode::CREATED);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let e = api
        .expect(&capture, json!({"requestId": "c2"}), StatusCode::CONFLICT)
        .await;
    assert_eq!(code(&e), "HOLD_NOT_ACTIVE");
    let e = api
        .expect(
            &format!("/wallet/rider/holds/{hold}/void"),
            json!({}),
            StatusCode::CONFLICT,
        )
        .await;
    assert_eq!(code(&e), "HOLD_NOT_ACTIVE");
    let unknown = uuid::Uuid::now_v7();
    let e = api
        .expect(
            &format!("/wallet/rider/holds/{unknown}/capture"),
            json!({}),
            StatusCode::NOT_FOUND,
        )
        .await;
    assert_eq!(code(&e), "HOLD_NOT_FOUND");
    let e = api
        .expect(
            "/wallet/rider/holds/not-a-uuid/void",
            json!({}),
            StatusCode::BAD_REQUEST,
        )
        .await;
    assert_eq!(code(&e), "INVALID_HOLD_ID");

    // A void gives everything back; a capture may not exceed the hold.
    let second = api.hold("rider", json!({"amount": "10"})).await;
    let e = api
        .expect(
            &format!("/wallet/rider/holds/{second}/capture"),
            json!({"amount": "10.0001"}),
            StatusCode::BAD_REQUEST,
        )
        .await;
    assert_eq!(code(&e), "CAPTURE_EXCEEDS_HOLD");
    let r = api
        .expect(
            &format!("/wallet/rider/holds/{second}/void"),
            json!({}),
            StatusCode::CREATED,
        )
        .await;
    assert_eq!(
        (r["status"].as_str(), r["available"].as_str()),
        (Some("voided"), Some("75.0000"))
    );

    let position = r["position"].as_i64().unwrap();
    let captured = api
        .get(&format!("/wallet/rider/holds?status=captured&minPosition={position}"))
        .await;
    assert_eq!(captured.as_array().unwrap().len(), 1);
    assert_eq!(captured[0]["holdId"], hold.as_str());
    assert_eq!(captured[0]["captured"], "25.0000");
    let all = api.get(&format!("/wallet/rider/holds?minPosition={position}")).await;
    assert_eq!(all.as_array().unwrap().len(), 2, "{all}");
    let page = api.get("/wallet/rider/holds?limit=1").await;
    assert_eq!(page[0]["holdId"], second.as_str(), "newest first");
    let stats = api.get(&format!("/wallet/rider/stats?minPosition={position}")).await;
    assert_eq!(
        (
            stats["holdsPlaced"].as_u64(),
            stats["holdsCaptured"].as_u64(),
            stats["holdsVoided"].as_u64()
        ),
        (Some(2), Some(1), Some(1))
    );
    api.verify().await;
}

async fn expiry(db: TestDb) {
    let api = Api::start(db).await;
    api.expect("/wallet/w/deposit", json!({"amount": 50}), StatusCode::CREATED)
        .await;
    let hold = api.hold("w", json!({"amount": "20", "expiresInSeconds": 1})).await;
    assert_eq!(api.wallet("w").await["available"], "30.0000");
    // The service records the expiry on its own, within seconds.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if api.wallet("w").await["held"] == "0.0000" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the hold did not expire on its own"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(api.wallet("w").await["available"], "50.0000");
    let e = api
        .expect(
            &format!("/wallet/w/holds/{hold}/capture"),
            json!({}),
            StatusCode::CONFLICT,
        )
        .await;
    assert_eq!(code(&e), "HOLD_NOT_ACTIVE");
    let events = api
        .store
        .read_stream(&WalletId::parse("w").unwrap(), 0, None)
        .await
        .unwrap();
    let expired = events
        .iter()
        .filter(|e| matches!(e.event, WalletEvent::HoldExpired(_)))
        .count();
    assert_eq!(expired, 1, "recorded as one HoldExpired event");
    api.verify().await;
}

async fn limits(db: TestDb) {
    let api = Api::start(db).await;
    let put = |wallet: &str, body: Value| {
        let path = format!("/wallet/{wallet}/limits");
        let api = &api;
        async move { api.send(reqwest::Method::PUT, &path, body).await }
    };
    let r = put("nobody", json!({"minBalance": 1})).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    api.expect("/wallet/a/deposit", json!({"amount": 100}), StatusCode::CREATED)
        .await;
    let r = put("a", json!({"minBalance": "20", "maxBalance": "10"})).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(code(&r.json().await.unwrap()), "INVALID_LIMITS");
    let r = put("a", json!({"minBalance": "10", "maxBalance": "150"})).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let w = api.wallet("a").await;
    assert_eq!(
        (w["minBalance"].as_str(), w["maxBalance"].as_str()),
        (Some("10.0000"), Some("150.0000"))
    );

    let e = api
        .expect(
            "/wallet/a/deposit",
            json!({"amount": "50.0001"}),
            StatusCode::BAD_REQUEST,
        )
        .await;
    assert_eq!(code(&e), "MAX_BALANCE_EXCEEDED");
    let e = api
        .expect(
            "/wallet/b/transfer",
            json!({"toWalletId": "a", "amount": 1}),
            StatusCode::NOT_FOUND,
        )
        .await;
    assert_eq!(code(&e), "WALLET_NOT_FOUND");
    let e = api
        .expect(
            "/wallet/a/withdraw",
            json!({"amount": "90.0001"}),
            StatusCode::BAD_REQUEST,
        )
        .await;
    assert_eq!(code(&e), "MIN_BALANCE_BREACHED");
    let e = api
        .expect("/wallet/a/holds", json!({"amount": "91"}), StatusCode::BAD_REQUEST)
        .await;
    assert_eq!(code(&e), "MIN_BALANCE_BREACHED");
    api.expect("/wallet/a/withdraw", json!({"amount": "90"}), StatusCode::CREATED)
        .await;
    api.expect("/wallet/a/deposit", json!({"amount": "140"}), StatusCode::CREATED)
        .await;
    api.verify().await;
}

/// Captures, voids and the sweeper race on holds that expire as they are
/// resolved, through two processes: each hold is resolved exactly once,
/// the one request that resolved it is the only one answered 201 (none if
/// it expired), every other is 409 HOLD_NOT_ACTIVE, and the money adds up.
async fn resolutions_race(db: TestDb) {
    let api = Arc::new(Api::start_two(db).await);
    api.expect("/wallet/payer/deposit", json!({"amount": 1000}), StatusCode::CREATED)
        .await;
    let mut holds = Vec::new();
    for _ in 0..20 {
        holds.push(
            api.hold(
                "payer",
                json!({"amount": "10", "expiresInSeconds": 1, "toWalletId": "payee"}),
            )
            .await,
        );
    }
    let mut tasks = Vec::new();
    for (i, hold) in holds.iter().enumerate() {
        for (j, action) in ["capture", "void", "capture"].into_iter().enumerate() {
            let (api, hold) = (api.clone(), hold.clone());
            let delay = Duration::from_millis(700 + (i as u64 % 5) * 100);
            let task = tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                api.post_via(i + j, &format!("/wallet/payer/holds/{hold}/{action}"), json!({}))
                    .await
            });
            tasks.push((i, action, task));
        }
    }
    let mut winners = vec![Vec::new(); holds.len()];
    for (i, action, t) in tasks {
        match t.await.unwrap() {
            (StatusCode::CREATED, _) => winners[i].push(action),
            (StatusCode::CONFLICT, body) => assert_eq!(code(&body), "HOLD_NOT_ACTIVE", "{action}: {body}"),
            (status, body) => panic!("a racing {action} answered {status}: {body}"),
        }
    }
    // Whatever was not captured or voided expires.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while api.wallet("payer").await["held"] != "0.0000" {
        assert!(tokio::time::Instant::now() < deadline, "holds left unresolved");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events = api
        .store
        .read_stream(&WalletId::parse("payer").unwrap(), 0, None)
        .await
        .unwrap();
    let mut captured = Decimal::ZERO;
    for (hold, winners) in holds.iter().zip(&winners) {
        let id = uuid::Uuid::parse_str(hold).unwrap();
        let resolutions: Vec<&WalletEvent> = events
            .iter()
            .map(|e| &e.event)
            .filter(|e| e.hold_id() == Some(id) && e.event_type() != "HoldPlaced")
            .collect();
        assert_eq!(resolutions.len(), 1, "hold {hold}: {resolutions:?}");
        let winner = match resolutions[0].event_type() {
            "HoldCaptured" => vec!["capture"],
            "HoldVoided" => vec!["void"],
            _ => vec![],
        };
        assert_eq!(
            *winners, winner,
            "hold {hold}: answered 201, resolved by {resolutions:?}"
        );
        if let WalletEvent::HoldCaptured(p) = resolutions[0] {
            captured += p.amount.value();
        }
    }
    let payer: Decimal = api.wallet("payer").await["balance"].as_str().unwrap().parse().unwrap();
    let payee: Decimal = api.wallet("payee").await["balance"]
        .as_str()
        .unwrap_or("0")
        .parse()
        .unwrap();
    assert_eq!(payer + payee, Decimal::from(1000), "money is conserved");
    assert_eq!(payee, captured);
    api.verify().await;
}

/// Withdrawals and holds racing on one wallet with a floor, through two
/// processes: whatever interleaving, available money never goes below it,
/// at any point of the wallet's log.
async fn withdrawals_race_holds(db: TestDb) {
    let api = Arc::new(Api::start_two(db).await);
    api.expect("/wallet/a/deposit", json!({"amount": 100}), StatusCode::CREATED)
        .await;
    let r = api
        .send(reqwest::Method::PUT, "/wallet/a/limits", json!({"minBalance": 10}))
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let mut tasks = Vec::new();
    for i in 0..60 {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            let path = if i % 2 == 0 {
                "/wallet/a/withdraw"
            } else {
                "/wallet/a/holds"
            };
            api.post_via(i / 2, path, json!({"amount": 3})).await
        }));
    }
    let mut accepted = 0;
    for t in tasks {
        match t.await.unwrap() {
            (StatusCode::CREATED, _) => accepted += 1,
            (StatusCode::BAD_REQUEST, body) => assert_eq!(code(&body), "MIN_BALANCE_BREACHED", "{body}"),
            (status, body) => panic!("answered {status}: {body}"),
        }
    }
    assert_eq!(accepted, 30, "exactly 90 of the 100 could leave available money");
    let w = api.wallet("a").await;
    assert_eq!(w["available"], "10.0000");
    let events = api
        .store
        .read_stream(&WalletId::parse("a").unwrap(), 0, None)
        .await
        .unwrap();
    let mut state = Wallet::empty(WalletId::parse("a").unwrap());
    for e in &events {
        state = state.evolve(&e.event);
        assert!(
            state.available() >= state.limits.min_balance,
            "version {}: available {} under the floor {}",
            e.version,
            state.available(),
            state.limits.min_balance
        );
    }
    api.verify().await;
}

/// An atomic batch with a refused operation in the middle writes nothing and
/// names it; one that passes commits every operation, replays as a whole.
async fn atomic_batches(db: TestDb) {
    let api = Api::start(db).await;
    api.expect("/wallet/a/deposit", json!({"amount": 100}), StatusCode::CREATED)
        .await;
    let head = api.store.head_position().await.unwrap();
    let refused = api
        .expect(
            "/batch",
            json!({"atomic": true, "operations": [
                {"op": "deposit", "walletId": "a", "amount": "10"},
                {"op": "withdraw", "walletId": "a", "amount": "1000"},
                {"op": "deposit", "walletId": "b", "amount": "5"}]}),
            StatusCode::BAD_REQUEST,
        )
        .await;
    assert_eq!(
        (code(&refused), refused["operationIndex"].as_u64()),
        ("INSUFFICIENT_FUNDS", Some(1))
    );
    assert_eq!(api.store.head_position().await.unwrap(), head, "nothing written");
    assert_eq!(api.wallet("b").await["exists"], false);

    let ops = json!({"atomic": true, "requestId": "batch-1", "operations": [
        {"op": "deposit", "walletId": "a", "amount": "10"},
        {"op": "hold", "walletId": "a", "amount": "100", "toWalletId": "shop"},
        {"op": "transfer", "walletId": "a", "toWalletId": "b", "amount": "10", "requestId": "t1"},
        {"op": "deposit", "walletId": "c", "amount": "1"}]});
    let done = api.expect("/batch", ops.clone(), StatusCode::CREATED).await;
    let results = done["results"].as_array().unwrap();
    assert_eq!(results.len(), 4);
    assert_eq!(results[0]["receipt"]["balance"], "110.0000");
    assert_eq!(
        results[1]["receipt"]["available"], "10.0000",
        "decided on the deposit before it"
    );
    assert_eq!(results[2]["receipt"]["fromBalance"], "100.0000");
    assert_eq!(results[2]["receipt"]["requestId"], "t1");
    assert_eq!(results[3]["receipt"]["created"], true);
    let w = api.wallet("a").await;
    assert_eq!(
        (w["balance"].as_str(), w["available"].as_str()),
        (Some("100.0000"), Some("0.0000"))
    );
    let again = api.post("/batch", ops).await;
    assert_eq!(again.status(), StatusCode::CREATED);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(api.wallet("a").await["balance"], "100.0000", "applied once");
    api.verify().await;
}

/// Each operation of an atomic batch may carry its own key: recorded with
/// the batch, so a retry without the batch's key replays it, each key
/// replays its own operation on its own route, and a key already naming
/// another request refuses the whole batch before anything is written.
async fn atomic_batch_operation_keys(db: TestDb) {
    let api = Api::start(db).await;
    api.expect(
        "/wallet/a/deposit",
        json!({"amount": 100, "requestId": "earlier"}),
        StatusCode::CREATED,
    )
    .await;
    let ops = json!({"atomic": true, "operations": [
        {"op": "withdraw", "walletId": "a", "amount": "30", "requestId": "k-w"},
        {"op": "deposit", "walletId": "b", "amount": "5", "requestId": "k-d"}]});
    let done = api.expect("/batch", ops.clone(), StatusCode::CREATED).await;
    let head = api.store.head_position().await.unwrap();

    let again = api.post("/batch", ops.clone()).await;
    assert_eq!(again.status(), StatusCode::CREATED);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.unwrap();
    let receipts = |v: &Value| {
        v["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["receipt"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(receipts(&again), receipts(&done), "the same receipts");
    assert!(again["results"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["replayed"] == true));
    assert_eq!(api.store.head_position().await.unwrap(), head, "applied once");

    let one = api
        .post("/wallet/b/deposit", json!({"amount": "5", "requestId": "k-d"}))
        .await;
    assert_eq!(one.status(), StatusCode::CREATED);
    assert_eq!(one.headers()["idempotent-replayed"], "true");
    let one: Value = one.json().await.unwrap();
    assert_eq!(one, done["results"][1]["receipt"], "the key replays its own operation");

    // A key recorded by another request, or one key on two operations.
    for reused in [
        json!({"op": "deposit", "walletId": "a", "amount": "1", "requestId": "earlier"}),
        json!({"op": "deposit", "walletId": "c", "amount": "1", "requestId": "k-new"}),
    ] {
        let batch = json!({"atomic": true, "operations": [
            {"op": "deposit", "walletId": "c", "amount": "1", "requestId": "k-new"}, reused]});
        let refused = api.expect("/batch", batch, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(code(&refused), "IDEMPOTENCY_KEY_REUSED", "{refused}");
        assert_eq!(api.store.head_position().await.unwrap(), head, "nothing written");
    }
    assert_eq!(api.wallet("c").await["exists"], false);

    let refused = json!({"atomic": true, "operations": [
        {"op": "withdraw", "walletId": "a", "amount": "1000", "requestId": "k-big"}]});
    let first = api.expect("/batch", refused.clone(), StatusCode::BAD_REQUEST).await;
    let second = api.post("/batch", refused).await;
    assert_eq!(second.headers()["idempotent-replayed"], "true", "a refusal replays too");
    let second: Value = second.json().await.unwrap();
    assert_eq!(code(&second), code(&first));
    api.verify().await;
}

/// An independent batch writes exactly the valid operations, decided in
/// request order, each with its own result and key.
async fn independent_batches(db: TestDb) {
    let api = Api::start(db).await;
    let ops = json!({"operations": [
        {"op": "deposit", "walletId": "x", "amount": "10", "requestId": "k1"},
        {"op": "withdraw", "walletId": "x", "amount": "10", "requestId": "k2"},
        {"op": "withdraw", "walletId": "x", "amount": "1", "requestId": "k3"},
        {"op": "deposit", "walletId": "not valid!", "amount": "1"},
        {"op": "capture", "walletId": "x", "holdId": uuid::Uuid::now_v7().to_string()},
        {"op": "transfer", "walletId": "y", "toWalletId": "x", "amount": "1"}]});
    let r = api.post("/batch", ops.clone()).await;
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    let statuses: Vec<u64> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, vec![201, 201, 400, 400, 404, 404]);
    let codes: Vec<&str> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["problem"]["code"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        codes,
        vec![
            "",
            "",
            "INSUFFICIENT_FUNDS",
            "INVALID_WALLET_ID",
            "HOLD_NOT_FOUND",
            "WALLET_NOT_FOUND"
        ]
    );
    let x = api.wallet("x").await;
    assert_eq!(
        (x["balance"].as_str(), x["version"].as_u64()),
        (Some("0.0000"), Some(3))
    );
    // Repeated: the keyed operations replay, nothing moves twice.
    let again: Value = api.post("/batch", ops).await.json().await.unwrap();
    assert_eq!(again["results"][0]["replayed"], true);
    assert_eq!(
        again["results"][2]["replayed"], true,
        "a remembered rejection replays too"
    );
    assert_eq!(api.wallet("x").await["version"], 3);

    // An operation of the wrong shape refuses the whole batch: it is not
    // the batch the client meant.
    let version = api.wallet("x").await["version"].clone();
    for bad in [
        json!({"op": "teleport", "walletId": "x"}),
        json!({"op": "deposit", "walletId": "x", "amount": 1, "holdId": uuid::Uuid::nil().to_string()}),
        json!({"op": "hold", "walletId": "x", "amount": 1, "expiresInSeconds": 0}),
    ] {
        let ops = json!({"operations": [{"op": "deposit", "walletId": "x", "amount": 1}, bad]});
        let e = api.expect("/batch", ops, StatusCode::BAD_REQUEST).await;
        assert_eq!(e["operationIndex"], 1, "{e}");
    }
    assert_eq!(api.wallet("x").await["version"], version, "nothing written");

    let too_many: Vec<Value> = (0..1001)
        .map(|_| json!({"op": "deposit", "walletId": "x", "amount": 1}))
        .collect();
    let e = api
        .expect("/batch", json!({"operations": too_many}), StatusCode::BAD_REQUEST)
        .await;
    assert_eq!(code(&e), "INVALID_BATCH");
    let thousand: Vec<Value> = (0..1000)
        .map(|i| json!({"op": "deposit", "walletId": format!("m{}", i % 50), "amount": 1}))
        .collect();
    let done = api
        .expect(
            "/batch",
            json!({"atomic": true, "operations": thousand}),
            StatusCode::CREATED,
        )
        .await;
    assert_eq!(done["results"].as_array().unwrap().len(), 1000);
    assert_eq!(api.wallet("m7").await["balance"], "20.0000");
    api.verify().await;
}

on_both_backends!(
    lifecycle,
    expiry,
    limits,
    resolutions_race,
    withdrawals_race_holds,
    atomic_batches,
    atomic_batch_operation_keys,
    independent_batches
);
