//! What the OpenAPI document says beyond the route annotations: the shared
//! input schemas (amounts, wallet ids, keys), the bearer security scheme,
//! and the answers and headers every route may give (added here once
//! rather than on each route, so no route can forget them).

use std::borrow::Cow;

use serde_json::json;
use utoipa::openapi::header::Header;
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::response::Response;
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, OneOfBuilder, SchemaFormat, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Content, OpenApi, Ref, RefOr, Schema};
use utoipa::Modify;

/// An amount as a client may send it: a JSON number or a decimal string.
/// The string pattern admits every text the service accepts (trailing
/// zeros after the fourth decimal included) and little else; the value
/// rules (> 0, at most 4 decimals, < 10^15) are in the description.
pub struct AmountInput;

/// A plain decimal string of at most 15 integer digits and 4 significant decimals.
pub const AMOUNT_PATTERN: &str = r"^0*[0-9]{1,15}(\.[0-9]{1,4}0*)?$";

impl utoipa::PartialSchema for AmountInput {
    fn schema() -> RefOr<Schema> {
        money(
            false,
            "A JSON number or a decimal string: greater than 0, at most 4 decimals, below 10^15. \
             Never rounded; a string keeps it exact in every client.",
        )
    }
}

/// A wallet limit: 0 or an amount, written like an amount.
pub struct LimitInput;

impl utoipa::PartialSchema for LimitInput {
    fn schema() -> RefOr<Schema> {
        money(
            true,
            "0 or an amount: a JSON number or a decimal string, at most 4 decimals, below 10^15.",
        )
    }
}

impl utoipa::ToSchema for LimitInput {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Limit")
    }
}

fn money(zero: bool, description: &str) -> RefOr<Schema> {
    let number = ObjectBuilder::new().schema_type(Type::Number);
    let number = if zero {
        number.minimum(Some(0))
    } else {
        number.exclusive_minimum(Some(0))
    };
    let number = number
        .exclusive_maximum(Some(1_000_000_000_000_000i64))
        .examples([json!(150.5)]);
    let text = ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(AMOUNT_PATTERN))
        .examples([json!("150.50")]);
    OneOfBuilder::new()
        .item(number)
        .item(text)
        .description(Some(description))
        .into()
}

impl utoipa::ToSchema for AmountInput {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Amount")
    }
}

/// The bearer scheme's name in the document.
const BEARER: &str = "bearer";
/// Routes that never ask for a key (`access.rs`).
const OPEN: [&str; 2] = ["/health", "/ready"];

/// Adds security, the answers any route may give, and the headers they carry.
pub struct Contract;

impl Modify for Contract {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key (`wallet keys new`): scope read for GET, write for POST, admin for \
                         PUT /wallet/{id}/limits. Required when the service has API_KEYS; one started without them is \
                         open and ignores it.",
                    ))
                    .build(),
            ),
        );
        for (path, item) in openapi.paths.paths.iter_mut() {
            let open = OPEN.contains(&path.as_str());
            for (write, operation) in operations(item) {
                document(operation, write, open);
            }
        }
    }
}

/// Each operation of a path, and whether it writes (POST, PUT).
fn operations(item: &mut PathItem) -> Vec<(bool, &mut Operation)> {
    let mut all = Vec::new();
    if let Some(op) = item.get.as_mut() {
        all.push((false, op));
    }
    if let Some(op) = item.post.as_mut() {
        all.push((true, op));
    }
    if let Some(op) = item.put.as_mut() {
        all.push((true, op));
    }
    all
}

fn document(operation: &mut Operation, write: bool, open: bool) {
    // The empty requirement says a request without a key may be served:
    // true of a service started without API_KEYS, and of the open routes.
    operation.security = Some(if open {
        vec![SecurityRequirement::default()]
    } else {
        vec![
            SecurityRequirement::new(BEARER, Vec::<String>::new()),
            SecurityRequirement::default(),
        ]
    });
    let responses = &mut operation.responses.responses;
    let mut refusals = vec![
        (
            "408",
            "REQUEST_TIMEOUT: the request took too long, or its body did not arrive in time",
        ),
        ("414", "URI_TOO_LONG: the URI is over 8 KiB"),
        (
            "431",
            "HEADERS_TOO_LARGE: the headers are over 32 KiB, or more than 100",
        ),
    ];
    if !open {
        refusals.extend([
            (
                "401",
                "UNAUTHORIZED: no valid API key (header WWW-Authenticate: Bearer)",
            ),
            ("403", "FORBIDDEN: the API key lacks the route's scope"),
            (
                "429",
                "RATE_LIMITED: the API key's or the client address's budget is spent",
            ),
        ]);
    }
    for (status, description) in refusals {
        responses
            .entry(status.to_owned())
            .or_insert_with(|| RefOr::T(problem(description)));
    }
    for (status, response) in responses.iter_mut() {
        let RefOr::T(response) = response else { continue };
        add_headers(response, status, write);
    }
}

fn problem(description: &str) -> Response {
    let mut response = Response::new(description);
    response.content.insert(
        "application/problem+json".to_owned(),
        Content::new(Some(Ref::from_schema_name("ProblemBody"))),
    );
    response
}

fn header(schema: ObjectBuilder, description: &str) -> Header {
    let mut header = Header::new(schema);
    header.description = Some(description.to_owned());
    header
}

fn uuid() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Uuid)))
}

fn add_headers(response: &mut Response, status: &str, write: bool) {
    let mut add = |name: &str, header: Header| {
        response.headers.entry(name.to_owned()).or_insert(header);
    };
    add(
        "X-Request-Id",
        header(
            ObjectBuilder::new().schema_type(Type::String),
            "this request's id (the one sent, else a new uuid); also in the logs",
        ),
    );
    if write {
        add(
            "X-Audit-Id",
            header(uuid(), "the id of this request's row in the audit trail (api_audit)"),
        );
    }
    if write && matches!(status, "201" | "400" | "404" | "409") {
        let replayed = ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(["true"]));
        add(
            "Idempotent-Replayed",
            header(
                replayed,
                "true when this answer replays the one recorded for the same requestId (nothing changed)",
            ),
        );
    }
    if matches!(status, "503" | "429") {
        let seconds = ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(1));
        add(
            "Retry-After",
            header(
                seconds,
                "seconds to wait before retrying; absent on OUTCOME_UNKNOWN (retry only with the same requestId)",
            ),
        );
    }
    if status == "401" {
        let bearer = ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(["Bearer"]));
        add("WWW-Authenticate", header(bearer, "the scheme to authenticate with"));
    }
}

/// A point in the log: a position or an RFC 3339 time (`?at=`).
pub struct PointInput;

impl utoipa::PartialSchema for PointInput {
    fn schema() -> RefOr<Schema> {
        let position = ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
            .minimum(Some(0));
        let time = ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)));
        OneOfBuilder::new().item(position).item(time).into()
    }
}

impl utoipa::ToSchema for PointInput {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("LogPoint")
    }
}

/// The `{id}` path segment (documentation only; `input::WalletPath` parses it).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub struct WalletIdParam {
    /// Wallet id: 1-128 characters of `A-Z a-z 0-9 . _ : -`.
    #[param(
        pattern = r"^[A-Za-z0-9._:-]{1,128}$",
        min_length = 1,
        max_length = 128,
        example = "alice"
    )]
    id: String,
}

/// The `Idempotency-Key` header (documentation only; `input::idempotency_key` reads it).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct KeyHeader {
    /// Idempotency key, instead of `requestId` in the body (if both are sent they must agree):
    /// 1-128 visible ASCII characters.
    #[param(
        rename = "Idempotency-Key",
        nullable = false,
        min_length = 1,
        max_length = 128,
        pattern = r"^[!-~]{1,128}$"
    )]
    idempotency_key: Option<String>,
}

#[cfg(test)]
mod tests {
    use serde_json::Value;
    use utoipa::OpenApi;

    fn document() -> Value {
        serde_json::to_value(super::super::ApiDoc::openapi()).unwrap()
    }

    fn param<'a>(doc: &'a Value, path: &str, method: &str, name: &str) -> &'a Value {
        doc["paths"][path][method]["parameters"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == name))
            .unwrap_or_else(|| panic!("{method} {path} has no parameter {name}"))
    }

    /// What a generated client needs: typed queries, exact amounts, the
    /// wallet id's alphabet, a plain optional key header, bearer auth.
    #[test]
    fn the_document_types_what_clients_send() {
        let doc = document();
        for (path, name, kind) in [
            ("/wallet/{id}/history", "limit", "integer"),
            ("/wallet/{id}/history", "before", "integer"),
            ("/wallet/{id}/history", "minPosition", "integer"),
            ("/wallet/{id}/flags", "before", "string"),
            ("/flags", "limit", "integer"),
            ("/wallet/{id}/holds", "before", "integer"),
        ] {
            assert_eq!(param(&doc, path, "get", name)["schema"]["type"], kind, "{path} {name}");
        }
        let at = &param(&doc, "/wallet/{id}", "get", "at")["schema"]["oneOf"];
        assert_eq!(at[0]["type"], "integer");
        assert_eq!(at[1]["format"], "date-time");
        let id = &param(&doc, "/wallet/{id}/deposit", "post", "id")["schema"];
        assert_eq!(id["pattern"], "^[A-Za-z0-9._:-]{1,128}$");
        let key = &param(&doc, "/wallet/{id}/deposit", "post", "Idempotency-Key");
        assert_eq!(key["required"], false);
        assert_eq!(key["schema"]["type"], "string", "not nullable: {key}");
        let amount = &doc["components"]["schemas"]["Amount"]["oneOf"];
        assert_eq!(amount[0]["type"], "number");
        assert_eq!(amount[1]["pattern"], super::AMOUNT_PATTERN);
        assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
        // No body example pre-fills a requestId: a second "Try it out" would replay it.
        assert_eq!(
            doc["components"]["schemas"]["MoneyBody"]["example"],
            serde_json::json!({"amount": "150.50"})
        );
    }

    #[test]
    fn response_headers_and_refusals_are_documented() {
        let doc = document();
        let deposit = &doc["paths"]["/wallet/{id}/deposit"]["post"]["responses"];
        for header in ["Idempotent-Replayed", "X-Audit-Id", "X-Request-Id"] {
            assert!(deposit["201"]["headers"][header].is_object(), "{header}");
        }
        assert!(deposit["503"]["headers"]["Retry-After"].is_object());
        assert!(deposit["401"]["headers"]["WWW-Authenticate"].is_object());
        for status in ["401", "403", "408", "414", "429", "431"] {
            assert!(deposit[status].is_object(), "{status}");
        }
        let history = &doc["paths"]["/wallet/{id}/history"]["get"]["responses"]["200"]["headers"];
        assert!(history["X-Projection-Position"].is_object() && history["X-Next-Before"].is_object());
        assert!(
            doc["paths"]["/health"]["get"]["responses"]["401"].is_null(),
            "/health is open"
        );
    }

    #[test]
    fn event_type_filter_lists_every_event_type() {
        let doc = document();
        let listed = &param(&doc, "/events", "get", "type")["schema"]["items"]["enum"];
        let listed: Vec<&str> = listed.as_array().unwrap().iter().filter_map(Value::as_str).collect();
        assert_eq!(listed, crate::aggregate::EVENT_TYPES);
    }
}
