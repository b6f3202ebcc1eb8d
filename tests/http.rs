//! The HTTP API against a real listening server on a real database, on both
//! backends: every route, every error of the brief's table, hostile input.

mod common;

use common::TestDb;
use reqwest::{Client, Response, StatusCode};
use serde_json::{json, Value};

struct Api {
    base: String,
    http: Client,
    _db: common::Cleanup,
}

impl Api {
    async fn start(db: TestDb) -> Self {
        Self {
            base: common::serve(db.store).await,
            http: Client::new(),
            _db: db.cleanup,
        }
    }
    async fn post(&self, path: &str, body: Value) -> Response {
        self.http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap()
    }
    async fn post_raw(&self, path: &str, body: &'static [u8]) -> Response {
        self.http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap()
    }
    async fn get(&self, path: &str) -> Response {
        self.http.get(format!("{}{path}", self.base)).send().await.unwrap()
    }
    async fn get_json(&self, path: &str) -> Value {
        let r = self.get(path).await;
        assert_eq!(r.status(), StatusCode::OK, "GET {path}");
        r.json().await.unwrap()
    }
    async fn balance(&self, wallet: &str) -> String {
        self.get_json(&format!("/wallet/{wallet}")).await["balance"]
            .as_str()
            .unwrap()
            .to_owned()
    }
}

/// Sends `request` over a plain TCP connection; returns the status line.
async fn raw_status_line(base: &str, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(base.trim_start_matches("http://"))
        .await
        .unwrap();
    // The server may answer and close before it has read everything.
    let _ = conn.write_all(request.as_bytes()).await;
    let mut buf = vec![0u8; 256];
    let n = conn.read(&mut buf).await.unwrap_or(0);
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

/// Asserts a problem+json answer with this status and code; returns the body.
async fn problem(r: Response, status: u16, code: &str) -> Value {
    assert_eq!(r.status().as_u16(), status, "expected {status} {code}");
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status);
    assert_eq!(body["statusCode"], status);
    for member in ["type", "title", "detail", "message", "error"] {
        assert!(body[member].is_string(), "problem lacks {member}: {body}");
    }
    body
}

async fn deposit_withdraw_and_read(db: TestDb) {
    let api = Api::start(db).await;
    let r = api.post("/wallet/alice/deposit", json!({"amount": 150.5})).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert!(r.headers().get("idempotent-replayed").is_none());
    assert!(
        r.headers().get("x-request-id").is_some(),
        "every answer carries a request id"
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["walletId"], "alice");
    assert_eq!(body["balance"], "150.5000");
    assert_eq!(body["created"], true);
    assert!(
        body["requestId"].as_str().is_some_and(|s| !s.is_empty()),
        "a server id when none is sent"
    );
    let p1 = body["position"].as_i64().unwrap();

    let body: Value = api
        .post("/wallet/alice/deposit", json!({"amount": "0.0001"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (body["balance"].as_str(), body["created"].as_bool()),
        (Some("150.5001"), Some(false))
    );
    assert!(body["position"].as_i64().unwrap() > p1);

    let r = api.post("/wallet/alice/withdraw", json!({"amount": "50.5001"})).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        (body["balance"].as_str(), body["created"].as_bool()),
        (Some("100.0000"), Some(false))
    );

    let view = api.get_json("/wallet/alice").await;
    assert_eq!(
        view,
        json!({"walletId": "alice", "balance": "100.0000", "available": "100.0000", "held": "0.0000",
               "minBalance": "0.0000", "exists": true, "version": 4})
    );
    let unknown = api.get_json("/wallet/nobody").await;
    assert_eq!(
        unknown,
        json!({"walletId": "nobody", "balance": "0.0000", "available": "0.0000", "held": "0.0000",
               "minBalance": "0.0000", "exists": false, "version": 0})
    );

    // Time travel: as of the first deposit's position.
    let then = api.get_json(&format!("/wallet/alice?at={p1}")).await;
    assert_eq!(
        (then["balance"].as_str(), then["version"].as_u64()),
        (Some("150.5000"), Some(2))
    );
    let then = api.get_json("/wallet/alice?at=2000-01-01T00:00:00Z").await;
    assert_eq!(then["exists"], false);
    problem(api.get("/wallet/alice?at=yesterday").await, 400, "INVALID_AT").await;
}

async fn withdraw_errors(db: TestDb) {
    let api = Api::start(db).await;
    let body = problem(
        api.post("/wallet/ghost/withdraw", json!({"amount": 1})).await,
        404,
        "WALLET_NOT_FOUND",
    )
    .await;
    assert_eq!(body["error"], "Not Found");
    api.post("/wallet/bob/deposit", json!({"amount": 10})).await;
    problem(
        api.post("/wallet/bob/withdraw", json!({"amount": "10.0001"})).await,
        400,
        "INSUFFICIENT_FUNDS",
    )
    .await;
    assert_eq!(
        api.balance("bob").await,
        "10.0000",
        "a rejected withdrawal changes nothing"
    );
    let r = api.post("/wallet/bob/withdraw", json!({"amount": 10})).await;
    assert_eq!(r.status(), StatusCode::CREATED, "exactly the balance can be withdrawn");
    assert_eq!(api.balance("bob").await, "0.0000");
}

async fn transfers(db: TestDb) {
    let api = Api::start(db).await;
    api.post("/wallet/a/deposit", json!({"amount": 100})).await;
    let r = api
        .post("/wallet/a/transfer", json!({"toWalletId": "b", "amount": "25.25"}))
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["fromWalletId"], "a");
    assert_eq!(body["toWalletId"], "b");
    assert_eq!(body["amount"], "25.2500");
    assert_eq!(body["status"], "completed");
    assert_eq!(body["fromBalance"], "74.7500");
    assert_eq!(body["toBalance"], "25.2500");
    assert!(body["transferId"]
        .as_str()
        .is_some_and(|s| uuid::Uuid::parse_str(s).is_ok()));
    assert!(body["position"].as_i64().is_some());
    assert!(body["requestId"].is_string());
    assert_eq!(api.balance("a").await, "74.7500");
    assert_eq!(api.balance("b").await, "25.2500");

    problem(
        api.post("/wallet/a/transfer", json!({"toWalletId": "a", "amount": 1}))
            .await,
        400,
        "SAME_WALLET",
    )
    .await;
    problem(
        api.post("/wallet/zed/transfer", json!({"toWalletId": "a", "amount": 1}))
            .await,
        404,
        "WALLET_NOT_FOUND",
    )
    .await;
    problem(
        api.post("/wallet/a/transfer", json!({"toWalletId": "b", "amount": 1000}))
            .await,
        400,
        "INSUFFICIENT_FUNDS",
    )
    .await;
    problem(
        api.post("/wallet/a/transfer", json!({"toWalletId": "b c", "amount": 1}))
            .await,
        400,
        "INVALID_WALLET_ID",
    )
    .await;
    assert_eq!(api.balance("a").await, "74.7500", "no rejected transfer moved money");
    assert_eq!(api.balance("b").await, "25.2500");

    // Both halves are in the history of their wallets with the same transfer id.
    let p = body["position"].as_i64().unwrap();
    let a = api.get_json(&format!("/wallet/a/history?minPosition={p}")).await;
    let b = api.get_json(&format!("/wallet/b/history?minPosition={p}")).await;
    assert_eq!(a[0]["type"], "TransferDebited");
    assert_eq!(b[0]["type"], "TransferCredited");
    assert_eq!(a[0]["transferId"], body["transferId"]);
    assert_eq!(b[0]["transferId"], body["transferId"]);
    assert_eq!(b[1]["type"], "WalletCreated", "the transfer opened b");
}

async fn history_pages(db: TestDb) {
    let api = Api::start(db).await;
    let mut p = 0;
    for i in 1..=5 {
        let r: Value = api
            .post("/wallet/h/deposit", json!({"amount": i}))
            .await
            .json()
            .await
            .unwrap();
        p = r["position"].as_i64().unwrap();
    }
    let r = api.get(&format!("/wallet/h/history?minPosition={p}")).await;
    assert!(
        r.headers()["x-projection-position"]
            .to_str()
            .unwrap()
            .parse::<i64>()
            .unwrap()
            >= p
    );
    let all: Value = r.json().await.unwrap();
    let items = all.as_array().unwrap();
    assert_eq!(items.len(), 6);
    let versions: Vec<u64> = items.iter().map(|i| i["version"].as_u64().unwrap()).collect();
    assert_eq!(versions, vec![6, 5, 4, 3, 2, 1], "newest first");
    let top = &items[0];
    assert_eq!(top["type"], "FundsDeposited");
    assert_eq!(top["walletId"], "h");
    assert_eq!(top["balanceAfter"], "15.0000");
    assert_eq!(top["payload"]["amount"], "5.0000");
    assert!(top["transferId"].is_null());
    for key in ["id", "occurredAt", "position"] {
        assert!(!top[key].is_null(), "history item lacks {key}");
    }

    let r = api.get("/wallet/h/history?limit=4").await;
    assert_eq!(r.headers()["x-next-before"], "3");
    let page1: Value = r.json().await.unwrap();
    assert_eq!(page1.as_array().unwrap().len(), 4);
    let page2 = api.get_json("/wallet/h/history?limit=4&before=3").await;
    let v: Vec<u64> = page2
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["version"].as_u64().unwrap())
        .collect();
    assert_eq!(
        v,
        vec![2, 1],
        "the second page continues exactly where the first stopped"
    );
    assert_eq!(api.get_json("/wallet/nobody/history").await, json!([]));

    for bad in ["limit=0", "limit=201", "limit=abc", "limit=-1", "limit=1.5"] {
        problem(api.get(&format!("/wallet/h/history?{bad}")).await, 400, "INVALID_LIMIT").await;
    }
    for bad in ["before=0", "before=x", "before=-3", "before=99999999999999999999"] {
        problem(
            api.get(&format!("/wallet/h/history?{bad}")).await,
            400,
            "INVALID_CURSOR",
        )
        .await;
    }
}

/// Follows `X-Next-Before` from `first` until a page comes back short;
/// returns every item.
async fn follow_pages(api: &Api, first: &str) -> Vec<Value> {
    let mut all = Vec::new();
    let mut path = first.to_owned();
    for _ in 0..50 {
        let r = api.get(&path).await;
        assert_eq!(r.status(), StatusCode::OK, "GET {path}");
        let next = r.headers().get("x-next-before").map(|v| v.to_str().unwrap().to_owned());
        let page: Vec<Value> = r.json().await.unwrap();
        all.extend(page);
        match next {
            Some(cursor) => path = format!("{first}&before={cursor}"),
            None => return all,
        }
    }
    panic!("paging {first} did not end");
}

/// Both rules fire on one withdrawal: two flags at one position. Paging one
/// flag at a time must still return each flag once.
async fn flag_pages_name_one_flag(db: TestDb) {
    let api = Api::start(db).await;
    api.post("/wallet/f/deposit", json!({"amount": "100000"})).await;
    let mut p = 0;
    for _ in 0..3 {
        let r: Value = api
            .post("/wallet/f/withdraw", json!({"amount": "10000"}))
            .await
            .json()
            .await
            .unwrap();
        p = r["position"].as_i64().unwrap();
    }
    let all = api.get_json(&format!("/wallet/f/flags?minPosition={p}")).await;
    let key = |f: &Value| (f["position"].as_i64().unwrap(), f["rule"].as_str().unwrap().to_owned());
    let expected: Vec<(i64, String)> = all.as_array().unwrap().iter().map(key).collect();
    assert_eq!(expected.len(), 4, "3 LARGE_OUTFLOW and 1 RAPID_OUTFLOWS: {all}");
    assert_eq!(expected[0].0, expected[1].0, "two flags share the last position: {all}");
    for first in ["/wallet/f/flags?limit=1", "/flags?walletId=f&limit=1"] {
        let paged: Vec<(i64, String)> = follow_pages(&api, first).await.iter().map(key).collect();
        assert_eq!(paged, expected, "{first}: every flag once, in order");
    }
    // A bare position still lists the flags below it.
    let below = api.get_json(&format!("/flags?walletId=f&before={p}")).await;
    assert_eq!(below.as_array().unwrap().len(), 2);
    for bad in [
        "before=0",
        "before=x",
        "before=5:NOPE",
        "before=:LARGE_OUTFLOW",
        "before=5:",
    ] {
        problem(api.get(&format!("/flags?{bad}")).await, 400, "INVALID_CURSOR").await;
    }
}

async fn idempotency(db: TestDb) {
    let api = Api::start(db).await;
    let first = api
        .post("/wallet/i/deposit", json!({"amount": "10", "requestId": "r1"}))
        .await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["requestId"], "r1");
    api.post("/wallet/i/deposit", json!({"amount": "5"})).await;

    // Same key, same payload (10 and "10.00" are the same amount): the original answer.
    let again = api
        .post("/wallet/i/deposit", json!({"amount": 10.00, "requestId": "r1"}))
        .await;
    assert_eq!(again.status(), StatusCode::CREATED);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(
        again.json::<Value>().await.unwrap(),
        first,
        "same body, same balance as then"
    );
    assert_eq!(api.balance("i").await, "15.0000", "the replay changed nothing");

    // Same key, different amount or operation: 422.
    problem(
        api.post("/wallet/i/deposit", json!({"amount": 11, "requestId": "r1"}))
            .await,
        422,
        "IDEMPOTENCY_KEY_REUSED",
    )
    .await;
    problem(
        api.post("/wallet/i/withdraw", json!({"amount": 10, "requestId": "r1"}))
            .await,
        422,
        "IDEMPOTENCY_KEY_REUSED",
    )
    .await;
    problem(
        api.post(
            "/wallet/i/transfer",
            json!({"toWalletId": "j", "amount": 10, "requestId": "r1"}),
        )
        .await,
        422,
        "IDEMPOTENCY_KEY_REUSED",
    )
    .await;
    // The key is scoped to the wallet in the path.
    let other = api
        .post("/wallet/other/deposit", json!({"amount": 1, "requestId": "r1"}))
        .await;
    assert_eq!(other.status(), StatusCode::CREATED);
    assert!(other.headers().get("idempotent-replayed").is_none());

    // A decided rejection is remembered, even after the funds arrive.
    problem(
        api.post("/wallet/i/withdraw", json!({"amount": 100, "requestId": "w1"}))
            .await,
        400,
        "INSUFFICIENT_FUNDS",
    )
    .await;
    api.post("/wallet/i/deposit", json!({"amount": 1000})).await;
    let replay = api
        .post("/wallet/i/withdraw", json!({"amount": 100, "requestId": "w1"}))
        .await;
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    problem(replay, 400, "INSUFFICIENT_FUNDS").await;

    // The header works like the body field, and a transfer replays too.
    let send = || {
        api.http
            .post(format!("{}/wallet/i/transfer", api.base))
            .header("Idempotency-Key", "t1")
            .json(&json!({"toWalletId": "j", "amount": "1.5"}))
            .send()
    };
    let t1: Value = send().await.unwrap().json().await.unwrap();
    let t2 = send().await.unwrap();
    assert_eq!(t2.headers()["idempotent-replayed"], "true");
    assert_eq!(t2.json::<Value>().await.unwrap(), t1);
    assert_eq!(api.balance("j").await, "1.5000");
    let both = api
        .http
        .post(format!("{}/wallet/i/deposit", api.base))
        .header("Idempotency-Key", "x1")
        .json(&json!({"amount": 1, "requestId": "x2"}))
        .send()
        .await
        .unwrap();
    problem(both, 400, "INVALID_REQUEST_ID").await;
    problem(
        api.post("/wallet/i/deposit", json!({"amount": 1, "requestId": "k".repeat(129)}))
            .await,
        400,
        "INVALID_REQUEST_ID",
    )
    .await;
}

async fn hostile_input(db: TestDb) {
    let api = Api::start(db).await;
    for amount in [json!(0.00005), json!("0.00005"), json!(1.12345)] {
        problem(
            api.post("/wallet/x/deposit", json!({"amount": amount})).await,
            400,
            "INVALID_AMOUNT",
        )
        .await;
    }
    for amount in [
        json!(1e15),
        json!("1000000000000000"),
        json!("99999999999999999999999999999999999"),
        json!(1e300),
    ] {
        problem(
            api.post("/wallet/x/deposit", json!({"amount": amount})).await,
            400,
            "INVALID_AMOUNT",
        )
        .await;
    }
    for amount in [
        json!(0),
        json!(-5),
        json!("-0"),
        json!("NaN"),
        json!("1e3"),
        json!(true),
        json!(null),
        json!([1]),
        json!(""),
    ] {
        problem(
            api.post("/wallet/x/deposit", json!({"amount": amount})).await,
            400,
            "INVALID_AMOUNT",
        )
        .await;
    }
    problem(
        api.post_raw("/wallet/x/deposit", b"{\"amount\": 1e3}").await,
        400,
        "INVALID_AMOUNT",
    )
    .await;
    problem(
        api.post_raw("/wallet/x/deposit", b"{\"amount\": -0}").await,
        400,
        "INVALID_AMOUNT",
    )
    .await;
    // The largest amount is accepted exactly.
    let r = api
        .post("/wallet/x/deposit", json!({"amount": "999999999999999.9999"}))
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.json::<Value>().await.unwrap()["balance"], "999999999999999.9999");

    problem(
        api.post_raw("/wallet/x/deposit", b"{\"amount\": ").await,
        400,
        "INVALID_REQUEST",
    )
    .await;
    problem(
        api.post_raw("/wallet/x/deposit", b"not json").await,
        400,
        "INVALID_REQUEST",
    )
    .await;
    problem(
        api.post_raw("/wallet/x/deposit", b"\xff\xfe").await,
        400,
        "INVALID_REQUEST",
    )
    .await;
    problem(api.post_raw("/wallet/x/deposit", b"[]").await, 400, "INVALID_REQUEST").await;
    problem(
        api.post("/wallet/x/deposit", json!({"amount": 1, "extra": 1})).await,
        400,
        "INVALID_REQUEST",
    )
    .await;
    problem(api.post("/wallet/x/deposit", json!({})).await, 400, "INVALID_REQUEST").await;
    problem(
        api.post("/wallet/x/deposit", json!({"amount": 1, "requestId": 5}))
            .await,
        400,
        "INVALID_REQUEST",
    )
    .await;
    problem(
        api.post("/wallet/x/transfer", json!({"amount": 1})).await,
        400,
        "INVALID_REQUEST",
    )
    .await;
    let deep = format!("{}{}", "[".repeat(5_000), "]".repeat(5_000));
    let r = api
        .http
        .post(format!("{}/wallet/x/deposit", api.base))
        .header("content-type", "application/json")
        .body(deep)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let r = api
        .http
        .post(format!("{}/wallet/x/deposit", api.base))
        .header("content-type", "application/json")
        .body(vec![b' '; 1 << 20])
        .send()
        .await
        .unwrap();
    problem(r, 413, "PAYLOAD_TOO_LARGE").await;
    let r = api
        .http
        .post(format!("{}/wallet/x/deposit", api.base))
        .header("content-type", "text/plain")
        .body("{\"amount\": 1}")
        .send()
        .await
        .unwrap();
    problem(r, 415, "UNSUPPORTED_MEDIA_TYPE").await;

    let long = "a".repeat(129);
    problem(
        api.post(&format!("/wallet/{long}/deposit"), json!({"amount": 1})).await,
        400,
        "INVALID_WALLET_ID",
    )
    .await;
    problem(api.get(&format!("/wallet/{long}")).await, 400, "INVALID_WALLET_ID").await;
    let ok = "a".repeat(128);
    assert_eq!(
        api.post(&format!("/wallet/{ok}/deposit"), json!({"amount": 1}))
            .await
            .status(),
        StatusCode::CREATED
    );
    for bad in ["a%20b", "%C3%A9", "a%2Fb", "%FF"] {
        problem(
            api.post(&format!("/wallet/{bad}/deposit"), json!({"amount": 1})).await,
            400,
            "INVALID_WALLET_ID",
        )
        .await;
        problem(
            api.get(&format!("/wallet/{bad}/history")).await,
            400,
            "INVALID_WALLET_ID",
        )
        .await;
    }
    // A 10 MB id: no client library builds such a URI, so speak HTTP by hand.
    let status = raw_status_line(
        &api.base,
        &format!("GET /wallet/{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(10 << 20)),
    )
    .await;
    assert!(status.starts_with("HTTP/1.1 4"), "a 10 MB id is a 4xx, got {status:?}");

    problem(api.get("/nope").await, 404, "NOT_FOUND").await;
    problem(api.get("/wallet/x/deposit").await, 405, "METHOD_NOT_ALLOWED").await;
    assert_eq!(
        api.get_json("/wallet/x").await["balance"],
        "999999999999999.9999",
        "nothing half-written"
    );
}

async fn system_routes(db: TestDb) {
    let api = Api::start(db).await;
    assert_eq!(api.get_json("/health").await["status"], "ok");
    assert_eq!(api.get_json("/ready").await["status"], "ready");
    let spec = api.get_json("/openapi.json").await;
    for path in [
        "/wallet/{id}/deposit",
        "/wallet/{id}/withdraw",
        "/wallet/{id}/transfer",
        "/wallet/{id}",
        "/wallet/{id}/history",
    ] {
        assert!(spec["paths"][path].is_object(), "spec lacks {path}");
    }
    let docs = api.get("/docs/").await;
    assert_eq!(docs.status(), StatusCode::OK);
    let html = docs.text().await.unwrap();
    assert!(html.contains("swagger"), "Swagger UI is served");
    let bundle = api.get("/docs/swagger-ui-bundle.js").await;
    assert_eq!(
        bundle.status(),
        StatusCode::OK,
        "the UI's script is served from the binary, offline"
    );
    let init = api.get("/docs/swagger-initializer.js").await.text().await.unwrap();
    assert!(init.contains("/openapi.json"), "the UI loads our spec: {init}");
    assert!(
        init.contains(r#""validatorUrl": "none""#),
        "the UI must not send the spec's URL to an outside validator: {init}"
    );
}

on_both_backends!(
    deposit_withdraw_and_read,
    withdraw_errors,
    transfers,
    history_pages,
    flag_pages_name_one_flag,
    idempotency,
    hostile_input,
    system_routes,
);
