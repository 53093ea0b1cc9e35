//! The OpenAPI 3.1 document of the HTTP API (`openapi/herald.json`), built
//! into the binary and served at `GET /v1/openapi.json`.
//!
//! It is the document the binary was built with, whatever the version:
//! `tests/api/openapi.rs` fails when it and the server disagree, and
//! `scripts/api-checks` runs schemathesis against the binary with it.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

/// Where herald serves the document.
pub const PATH: &str = "/v1/openapi.json";

/// The document, as committed.
pub const DOCUMENT: &str = include_str!("../openapi/herald.json");

/// The document's route.
pub fn router() -> axum::Router {
    axum::Router::new()
        .route(PATH, get(|| async { ([(header::CONTENT_TYPE, "application/json")], DOCUMENT).into_response() }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_document_is_json_and_names_its_own_path() {
        let doc: serde_json::Value = serde_json::from_str(super::DOCUMENT).expect("the document is JSON");
        assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
        assert!(doc["paths"][super::PATH]["get"].is_object());
    }
}
