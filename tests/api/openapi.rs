//! The OpenAPI document (`openapi/herald.json`) against the real server.
//!
//! - herald serves the committed document at `/v1/openapi.json`;
//! - every operation it names is served: its examples get a documented 2xx,
//!   and no other method is served on its paths;
//! - every answer herald gives in the scenarios below, one per status the
//!   contract names, is one the document names for that operation, with the
//!   documented content type, headers and body schema;
//! - every status the document names is given by some scenario here.
//!
//! So a route or a status in the document that the server lacks fails, and
//! so does an answer of the server that the document lacks. schemathesis
//! (`scripts/api-checks`) checks the same document with generated requests.

use std::collections::BTreeSet;
use std::time::Duration;

use reqwest::header::{CONTENT_TYPE, HeaderMap};
use reqwest::{Method, RequestBuilder};
use serde_json::{Value, json};

use crate::fleet::{Redis, in_fleet};
use crate::helpers::*;

/// The committed document.
struct Document(Value);

/// An operation the document names: (method, path).
type Operation = (Method, String);

/// A JSON pointer token.
fn token(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

impl Document {
    fn text() -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi/herald.json");
        std::fs::read_to_string(path).expect("openapi/herald.json")
    }

    fn load() -> Document {
        Document(serde_json::from_str(&Self::text()).expect("the document is JSON"))
    }

    fn operations(&self) -> Vec<Operation> {
        let mut ops = Vec::new();
        for (path, item) in self.0["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("a path item").keys() {
                ops.push((Method::from_bytes(method.to_ascii_uppercase().as_bytes()).unwrap(), path.clone()));
            }
        }
        ops
    }

    /// `path` with each parameter (`{id}`) replaced by its documented example.
    fn example_path(&self, op: &Operation) -> String {
        let (_, operation) = self.resolve(self.operation_at(op));
        let mut path = op.1.clone();
        for parameter in operation["parameters"].as_array().into_iter().flatten().filter(|p| p["in"] == "path") {
            let name = parameter["name"].as_str().expect("a parameter's name");
            let example =
                parameter["example"].as_str().unwrap_or_else(|| panic!("{}: document {name}'s example", op.1));
            path = path.replace(&format!("{{{name}}}"), example);
        }
        assert!(!path.contains('{'), "{}: a parameter without an example", op.1);
        path
    }

    /// The pointer of `method path`'s operation.
    fn operation_at(&self, (method, path): &Operation) -> String {
        format!("/paths/{}/{}", token(path), method.as_str().to_ascii_lowercase())
    }

    /// Follows `$ref`s (local ones, the only kind the document has) from
    /// `pointer`: where the value really is, and the value.
    fn resolve(&self, mut pointer: String) -> (String, &Value) {
        loop {
            let value = self.0.pointer(&pointer).unwrap_or_else(|| panic!("nothing at #{pointer}"));
            match value.get("$ref").and_then(Value::as_str) {
                Some(target) => pointer = target.strip_prefix('#').expect("a local $ref").to_owned(),
                None => return (pointer, value),
            }
        }
    }

    /// Every (method, path, status) the document names.
    fn statuses(&self) -> BTreeSet<(String, String, u16)> {
        let mut all = BTreeSet::new();
        for op in self.operations() {
            let (_, operation) = self.resolve(self.operation_at(&op));
            for status in operation["responses"].as_object().expect("responses").keys() {
                all.insert((op.0.to_string(), op.1.clone(), status.parse().expect("a numeric status")));
            }
        }
        all
    }

    /// `instance` against the schema at `pointer`, its `$ref`s resolved in the document.
    fn validate(&self, pointer: &str, instance: &Value) -> Result<(), String> {
        let mut root = self.0.clone();
        // As a URI fragment: a path's parameters' braces percent-encoded.
        root["$ref"] = json!(format!("#{}", pointer.replace('{', "%7B").replace('}', "%7D")));
        let validator = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft202012)
            .build(&root)
            .unwrap_or_else(|e| panic!("the schema at #{pointer} does not compile: {e}"));
        let errors: Vec<String> = validator.iter_errors(instance).map(|e| e.to_string()).collect();
        if errors.is_empty() { Ok(()) } else { Err(errors.join("; ")) }
    }

    /// Fails unless the document names this answer to `op`, as it was given.
    fn check(&self, op: &Operation, status: u16, headers: &HeaderMap, body: &[u8]) {
        let (method, path) = op;
        let text = String::from_utf8_lossy(body);
        let (at, operation) = self.resolve(self.operation_at(op));
        assert!(operation.is_object(), "{method} {path} is not in the document");
        assert!(
            operation["responses"].get(status.to_string()).is_some(),
            "{method} {path} answered {status}, which the document does not name: {text}"
        );
        let (at, response) = self.resolve(format!("{at}/responses/{status}"));
        if let Some(documented) = response.get("headers").and_then(Value::as_object) {
            for name in documented.keys() {
                let (at, header) = self.resolve(format!("{at}/headers/{}", token(name)));
                let value = headers.get(name.as_str()).map(|v| v.to_str().expect("a visible header"));
                if header["required"] == true {
                    assert!(value.is_some(), "{method} {path} {status}: no {name} header");
                }
                if let Some(value) = value {
                    self.validate(&format!("{at}/schema"), &json!(value))
                        .unwrap_or_else(|e| panic!("{method} {path} {status}: {name}: {value:?}: {e}"));
                }
            }
        }
        let Some(content) = response.get("content").and_then(Value::as_object) else {
            assert!(body.is_empty(), "{method} {path} {status}: a body the document does not name: {text}");
            return;
        };
        let content_type = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
        let media = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
        assert!(
            content.contains_key(&media),
            "{method} {path} {status}: Content-Type {content_type:?}, the document names {:?}",
            content.keys().collect::<Vec<_>>()
        );
        let instance = if media == "application/json" {
            serde_json::from_slice(body).unwrap_or_else(|e| panic!("{method} {path} {status}: not JSON ({e}): {text}"))
        } else {
            json!(text)
        };
        self.validate(&format!("{at}/content/{}/schema", token(&media)), &instance)
            .unwrap_or_else(|e| panic!("{method} {path} {status}: {text}: {e}"));
    }
}

/// Calls the server, checks each answer against the document and notes its status.
struct Api {
    doc: Document,
    seen: BTreeSet<(String, String, u16)>,
}

impl Api {
    fn new() -> Api {
        Api { doc: Document::load(), seen: BTreeSet::new() }
    }

    async fn call(
        &mut self,
        app: &TestApp,
        method: Method,
        path: &str,
        request: impl FnOnce(RequestBuilder) -> RequestBuilder,
    ) -> (u16, Value) {
        self.call_at(app, method, path, path, request).await
    }

    /// Calls `url_path`, an instance of the documented `path` (its
    /// parameters filled in).
    async fn call_at(
        &mut self,
        app: &TestApp,
        method: Method,
        path: &str,
        url_path: &str,
        request: impl FnOnce(RequestBuilder) -> RequestBuilder,
    ) -> (u16, Value) {
        let response =
            request(app.http.request(method.clone(), app.url(url_path))).send().await.expect("herald answers");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.bytes().await.expect("the body");
        self.doc.check(&(method.clone(), path.to_owned()), status, &headers, &body);
        self.seen.insert((method.to_string(), path.to_owned(), status));
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    /// POSTs `body` as JSON with the publish token.
    async fn post(&mut self, app: &TestApp, path: &str, body: &str) -> (u16, Value) {
        let body = body.to_owned();
        self.call(app, Method::POST, path, |r| {
            r.bearer_auth(PUBLISH_TOKEN).header(CONTENT_TYPE, "application/json").body(body)
        })
        .await
    }
}

#[tokio::test]
async fn herald_serves_its_document_and_every_operation_in_it() {
    let app = spawn_app().await;
    let mut api = Api::new();
    let (status, served) = api.call(&app, Method::GET, herald::openapi::PATH, |r| r).await;
    assert_eq!(status, 200);
    assert_eq!(served, api.doc.0, "the served document is the committed one");
    assert_eq!(herald::openapi::DOCUMENT, Document::text());

    for op in api.doc.operations() {
        let (method, path) = &op;
        let (at, operation) = api.doc.resolve(api.doc.operation_at(&op));
        let secured = operation.get("security").and_then(Value::as_array).is_some_and(|s| !s.is_empty());
        let examples: Vec<Value> = match operation.get("requestBody") {
            None => vec![Value::Null],
            Some(_) => {
                let (_, body) = api.doc.resolve(format!("{at}/requestBody"));
                let examples = body["content"]["application/json"]["examples"].as_object();
                let examples = examples.unwrap_or_else(|| panic!("{method} {path}: document its request's examples"));
                examples.values().map(|e| e["value"].clone()).collect()
            }
        };
        let url_path = api.doc.example_path(&op);
        for example in examples {
            let body = (!example.is_null()).then(|| example.to_string());
            let (status, answer) = api
                .call_at(&app, method.clone(), path, &url_path, |r| {
                    let r = r.bearer_auth(PUBLISH_TOKEN);
                    match body {
                        Some(body) => r.header(CONTENT_TYPE, "application/json").body(body),
                        None => r,
                    }
                })
                .await;
            assert!((200..300).contains(&status), "{method} {path} with {example}: {status} {answer}");
        }
        if secured {
            let (status, _) =
                api.call(&app, method.clone(), path, |r| r.header(CONTENT_TYPE, "application/json")).await;
            assert_eq!(status, 401, "{method} {path} without the token");
        }
    }

    // No method the document does not name is served on its paths.
    let documented: BTreeSet<Operation> = api.doc.operations().into_iter().collect();
    let paths: BTreeSet<String> = documented.iter().map(|(_, path)| path.clone()).collect();
    for path in &paths {
        for method in [Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
            if documented.contains(&(method.clone(), path.clone())) {
                continue;
            }
            let response =
                app.http.request(method.clone(), app.url(path)).bearer_auth(PUBLISH_TOKEN).send().await.unwrap();
            assert_eq!(response.status().as_u16(), 405, "{method} {path} is served, and not documented");
        }
    }
}

/// Every status the contract names, given by the real server, is documented
/// as it is given; and every status the document names is given here.
#[tokio::test]
async fn every_answer_is_documented_and_every_documented_answer_is_given() {
    let Some(mut redis) = Redis::start().await else { return };
    let app = spawn_app_with(Backend::Sqlite, |c| c.publish.max_body_bytes = 4096).await;
    let mut api = Api::new();
    let over = format!(
        r#"{{"type": "state_invalidated", "payload": {{"campaignId": "c1", "scope": "campaign", "pad": "{}"}}}}"#,
        "x".repeat(5000)
    );
    for path in ["/v1/events", "/v1/access/revoke"] {
        let (status, answer) =
            api.call(&app, Method::POST, path, |r| r.header(CONTENT_TYPE, "application/json").body("{}")).await;
        assert_eq!((status, answer), (401, json!({"error": "Unauthorized"})), "{path}");
        for auth in ["Bearer wrong-token", "Basic dXNlcjpwYXNz", PUBLISH_TOKEN] {
            let (status, _) =
                api.call(&app, Method::POST, path, |r| r.header("authorization", auth).json(&json!({}))).await;
            assert_eq!(status, 401, "{path} with {auth:?}");
        }
        for content_type in [None, Some("text/plain"), Some("application/x-www-form-urlencoded")] {
            let (status, _) = api
                .call(&app, Method::POST, path, |r| {
                    let r = r.bearer_auth(PUBLISH_TOKEN).body("{}");
                    match content_type {
                        Some(t) => r.header(CONTENT_TYPE, t),
                        None => r,
                    }
                })
                .await;
            assert_eq!(status, 415, "{path} with {content_type:?}");
        }
        assert_eq!(api.post(&app, path, &over).await.0, 413, "{path}");
        for (body, error) in [
            ("", "body: invalid JSON"),
            ("{} GARBAGE", "body: invalid JSON"),
            ("5", "body: expected an"),
            (r#"{"nope": 1}"#, ""),
        ] {
            let (status, answer) = api.post(&app, path, body).await;
            assert_eq!(status, 400, "{path} {body}");
            assert!(answer["error"].as_str().unwrap().starts_with(error), "{path} {body}: {answer}");
        }
    }
    let event = bodies::state_invalidated("c1").to_string();
    assert_eq!(api.post(&app, "/v1/events", &event).await, (202, json!({"accepted": 1})));
    assert_eq!(api.post(&app, "/v1/events", &format!("[{event}, {event}]")).await, (202, json!({"accepted": 2})));
    assert_eq!(api.post(&app, "/v1/events", "[]").await, (202, json!({"accepted": 0})));
    // Idempotency: a retry under the same key is a duplicate; the header on a batch is refused.
    let keyed = |body: String, key: &'static str| {
        move |r: RequestBuilder| {
            r.bearer_auth(PUBLISH_TOKEN)
                .header(CONTENT_TYPE, "application/json")
                .header("idempotency-key", key)
                .body(body)
        }
    };
    for expected in [json!({"accepted": 1}), json!({"accepted": 1, "duplicates": 1})] {
        let answer = api.call(&app, Method::POST, "/v1/events", keyed(event.clone(), "openapi-1")).await;
        assert_eq!(answer, (202, expected));
    }
    let (status, answer) = api.call(&app, Method::POST, "/v1/events", keyed(format!("[{event}]"), "openapi-2")).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer["error"].as_str().unwrap().starts_with("Idempotency-Key: "), "{answer}");
    let revoke = r#"{"userId": "alice", "campaignId": "c1"}"#;
    assert_eq!(api.post(&app, "/v1/access/revoke", revoke).await, (202, json!({"revoked": true})));
    // Presence: the members, a room that is not one, no token.
    let presence = "/v1/presence/{kind}/{id}";
    let with_token = |r: RequestBuilder| r.bearer_auth(PUBLISH_TOKEN);
    let empty = json!({"room": "campaign:c1", "members": [], "count": 0});
    assert_eq!(api.call_at(&app, Method::GET, presence, "/v1/presence/campaign/c1", with_token).await, (200, empty));
    let (status, answer) = api.call_at(&app, Method::GET, presence, "/v1/presence/guild/c1", with_token).await;
    assert_eq!(status, 400, "{answer}");
    let (status, _) = api.call_at(&app, Method::GET, presence, "/v1/presence/campaign/c1", |r| r).await;
    assert_eq!(status, 401);
    assert_eq!(api.call(&app, Method::GET, "/healthz", |r| r).await, (200, json!({"status": "ok"})));
    assert_eq!(api.call(&app, Method::GET, "/readyz", |r| r).await, (200, json!({"status": "ready"})));
    // With an authorization hook, /readyz names its circuit (and stays 200).
    let hooked = spawn_hooked_app(|_| {}).await;
    let with_hook = json!({"status": "ready", "accessHook": {"circuit": "closed"}});
    assert_eq!(api.call(&hooked, Method::GET, "/readyz", |r| r).await, (200, with_hook));
    assert_eq!(api.call(&app, Method::GET, "/metrics", |r| r).await.0, 200);
    run_sql(&app.database_url, "ALTER TABLE campaign_members RENAME TO campaign_members_away;").await;
    let not_ready = json!({"status": "not ready", "failing": {"store": "unavailable"}});
    assert_eq!(api.call(&app, Method::GET, "/readyz", |r| r).await, (503, not_ready));
    // A user's revocation with the store unavailable: 503, nothing revoked.
    run_sql(&app.database_url, "ALTER TABLE herald_user_revocations RENAME TO herald_user_revocations_away;").await;
    let store_away = json!({"error": "the membership store is unavailable; nothing was revoked"});
    assert_eq!(api.post(&app, "/v1/access/revoke", r#"{"userId": "bob"}"#).await, (503, store_away));

    // The event log silent (Redis paused): 504, the outcome unknown, for a
    // publish and for a revocation (each the first call of a pause: later
    // ones find Redis known down, a 503).
    let fleet = spawn_app_with(Backend::Sqlite, |c| in_fleet(c, &redis.url(), "herald-openapi")).await;
    for (path, body) in [("/v1/events", event.as_str()), ("/v1/access/revoke", revoke)] {
        wait_for_202(&mut api, &fleet, path, body).await;
        redis.pause(true);
        let (status, answer) = api.post(&fleet, path, body).await;
        redis.pause(false);
        assert_eq!(status, 504, "{path}: {answer}");
        assert_eq!((answer["accepted"].clone(), answer["unknown"].clone()), (json!(0), json!(1)), "{path}: {answer}");
    }

    // The event log unavailable: 503 with `accepted`.
    wait_for_202(&mut api, &fleet, "/v1/events", &event).await;
    redis.kill();
    // Once herald knows Redis is down (its readiness says so), nothing is
    // handed over: a 503 with `accepted: 0`. (A call racing the kill may
    // find its command written and unanswered: a 504.)
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while api.call(&fleet, Method::GET, "/readyz", |r| r).await.0 != 503 {
        assert!(std::time::Instant::now() < deadline, "readyz never said 503");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for path in ["/v1/events", "/v1/access/revoke"] {
        let body = if path == "/v1/events" { event.as_str() } else { revoke };
        let (status, answer) = api.post(&fleet, path, body).await;
        assert_eq!(status, 503, "{path}: {answer}");
        assert_eq!(answer["accepted"], 0, "{path}: {answer}");
    }
    api.call(&fleet, Method::GET, herald::openapi::PATH, |r| r).await;
    // Presence, which a fleet reads from Redis: unavailable.
    let presence = "/v1/presence/{kind}/{id}";
    let (status, answer) =
        api.call_at(&fleet, Method::GET, presence, "/v1/presence/campaign/c1", |r| r.bearer_auth(PUBLISH_TOKEN)).await;
    assert_eq!(status, 503, "{answer}");

    let documented = api.doc.statuses();
    let missing: Vec<_> = documented.difference(&api.seen).collect();
    assert!(missing.is_empty(), "documented, never given here (add a scenario): {missing:?}");
}

/// POSTs `body` until it is accepted (Redis back after a pause), for 10 s at most.
async fn wait_for_202(api: &mut Api, app: &TestApp, path: &str, body: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, answer) = api.post(app, path, body).await;
        if status == 202 {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{path} never accepted again: {status} {answer}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
