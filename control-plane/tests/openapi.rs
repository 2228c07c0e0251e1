//! `GET /v1/openapi.json`: an OpenAPI 3.1 document, open to anyone, and it
//! matches what the server serves. The router and the document are built
//! from the same `routes!` lists (api/openapi.rs), so this checks the
//! live server against the document both ways: every documented
//! path and method is served (no 404 "no such API endpoint", no 405), and
//! every other method on those paths is not (405); and no route is added
//! to a router outside those lists.

#[macro_use]
mod common;

use berth_protocol::ErrorCode;
use common::*;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use std::collections::BTreeSet;

const METHODS: [&str; 5] = ["get", "put", "post", "delete", "patch"];
/// The fallback's message: no route has this path.
const NO_ROUTE: &str = "path: no such API endpoint";

on_both_stores!(openapi_document_matches_the_router);

async fn openapi_document_matches_the_router(db: &Db) {
    let cp = Cp::start(db).await;
    // Open: no credentials.
    let r = Reply::from(cp.http.get(format!("{}/v1/openapi.json", cp.url)).send().await.unwrap()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let doc: Value = serde_json::from_str(&r.body).expect("the document is JSON");
    // Kept for a look (and for docs/api.md's "generate a client").
    std::fs::write(
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("openapi.json"),
        &r.body,
    )
    .unwrap();
    // OpenAPI 3.1, in the shape utoipa's model reads.
    assert_eq!(doc["openapi"], "3.1.0");
    check_refs(&doc, &doc);

    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["admin"]["scheme"], "bearer", "{schemes}");
    assert_eq!(
        (&schemes["session"]["in"], &schemes["session"]["name"]),
        (&"cookie".into(), &"__Host-berth_session".into()),
        "{schemes}"
    );
    for h in [
        "x-berth-node",
        "x-berth-timestamp",
        "x-berth-nonce",
        "x-berth-signature",
    ] {
        assert_eq!(schemes[h]["in"], "header", "{h}: {schemes}");
    }
    let code = &doc["components"]["schemas"]["ErrorCode"];
    assert_eq!(code["type"], "string", "{code}");
    assert!(
        code["enum"]
            .as_array()
            .is_some_and(|e| e.contains(&"invalid_field".into())),
        "{code}"
    );
    assert!(doc["components"]["schemas"]["ApiError"]["properties"]["field"].is_object());

    let paths = doc["paths"].as_object().expect("paths");
    let mut documented = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for (path, item) in paths {
        for m in METHODS {
            if let Some(op) = item.get(m) {
                documented.insert((path.clone(), m));
                let id = op["operationId"].as_str().unwrap_or_default();
                assert!(
                    ids.insert(id.to_string()),
                    "operationId {id:?} of {m} {path} is not unique"
                );
                for range in ["4XX", "5XX"] {
                    assert!(op["responses"].get(range).is_some(), "{m} {path}: no {range} response");
                }
            }
        }
    }
    // Spot checks: each group is in, with its security.
    for (path, m, security) in [
        ("/healthz", "get", None),
        ("/v1/openapi.json", "get", None),
        ("/v1/register", "post", None),
        ("/v1/services", "post", Some("admin")),
        ("/v1/services/{name}/exec", "get", Some("admin")),
        ("/v1/nodes/{name}", "delete", Some("admin")),
        ("/v1/agent/desired", "get", Some("x-berth-signature")),
        ("/v1/agent/builds/{id}/done", "post", Some("x-berth-node")),
        ("/v1/users", "post", Some("admin")),
        ("/v1/services/{name}/restart", "post", Some("admin")),
        ("/v1/session", "get", Some("session")),
        ("/v1/session", "delete", Some("session")),
    ] {
        assert!(
            documented.contains(&(path.to_string(), m)),
            "{m} {path} is not documented"
        );
        let op = &doc["paths"][path][m];
        match security {
            None => assert!(op.get("security").is_none(), "{m} {path}: {op}"),
            Some(s) => assert!(op["security"][0].get(s).is_some(), "{m} {path} needs {s}: {op}"),
        }
        // The admin's routes take the dashboard's cookie as well.
        if security == Some("admin") {
            assert!(op["security"][1].get("session").is_some(), "{m} {path}: {op}");
        }
    }
    // Signing in needs nothing.
    let login = &doc["paths"]["/v1/session"]["post"];
    assert!(
        login["security"]
            .as_array()
            .is_none_or(|a| a.iter().all(|r| r.as_object().is_some_and(|o| o.is_empty()))),
        "{login}"
    );
    assert_eq!(
        doc["paths"]["/v1/events"]["get"]["responses"]["200"]["content"]["application/x-ndjson"]["schema"]["$ref"],
        "#/components/schemas/Event"
    );
    assert!(doc["paths"]["/v1/services/{name}/exec"]["get"]["description"]
        .as_str()
        .is_some_and(|d| d.contains("WebSocket")));

    // The live server, without credentials: every documented operation is
    // routed (its answer is the handler's or the auth check's), every
    // other method on its path is a 405.
    for (path, item) in paths {
        let url = format!("{}{}", cp.url, fill(path));
        for m in METHODS {
            let method = Method::from_bytes(m.to_uppercase().as_bytes()).unwrap();
            let resp = cp.http.request(method, &url).send().await.unwrap();
            let allow = resp.headers().get("allow").map(|v| v.to_str().unwrap().to_string());
            let r = Reply::from(resp).await;
            if item.get(m).is_some() {
                assert_ne!(
                    r.status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{m} {path} is documented, not served"
                );
                assert!(
                    !r.body.contains(NO_ROUTE),
                    "{m} {path} is documented, not routed: {}",
                    r.body
                );
                if !r.status.is_success() && r.status != StatusCode::SWITCHING_PROTOCOLS {
                    let e: berth_protocol::ApiError = serde_json::from_str(&r.body)
                        .unwrap_or_else(|e| panic!("{m} {path}: error is not an ApiError ({e}): {}", r.body));
                    assert!(
                        e.field.is_some_and(|f| !f.is_empty()),
                        "{m} {path}: no field: {}",
                        r.body
                    );
                }
            } else {
                assert_eq!(
                    r.status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{m} {path} is served but not documented: {}",
                    r.body
                );
                r.coded(
                    StatusCode::METHOD_NOT_ALLOWED,
                    ErrorCode::MethodNotAllowed,
                    Some("method"),
                );
                let allow = allow.unwrap_or_else(|| panic!("{m} {path}: 405 without Allow"));
                for other in METHODS.iter().filter(|o| item.get(**o).is_some()) {
                    assert!(allow.contains(&other.to_uppercase()), "{m} {path}: Allow {allow:?}");
                }
            }
        }
    }
    // And a path that is not documented is not served.
    let r = Reply::from(cp.http.get(format!("{}/v1/nope", cp.url)).send().await.unwrap()).await;
    r.error(StatusCode::NOT_FOUND, NO_ROUTE);
}

/// A path with its `{params}` filled: "1" parses as every parameter type.
fn fill(path: &str) -> String {
    let mut out = String::new();
    let mut rest = path;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        out.push('1');
        rest = &rest[i + rest[i..].find('}').unwrap() + 1..];
    }
    out + rest
}

/// Every `$ref` points at a component that exists.
fn check_refs(doc: &Value, v: &Value) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get("$ref") {
                let target = r
                    .strip_prefix('#')
                    .and_then(|p| doc.pointer(p))
                    .unwrap_or_else(|| panic!("dangling $ref {r}"));
                assert!(target.is_object(), "{r}");
            }
            m.values().for_each(|x| check_refs(doc, x));
        }
        Value::Array(a) => a.iter().for_each(|x| check_refs(doc, x)),
        _ => {}
    }
}

/// Routes reach a router only through `routes!` (and so the document):
/// a plain axum `.route(...)` anywhere in the control plane would be
/// served undocumented, and the checks above could not see it. The one
/// exception is the dashboard's page and assets (`src/dashboard.rs`):
/// they are not API.
#[test]
fn no_route_bypasses_the_document() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found = vec![];
    let mut dirs = vec![src];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") && !p.ends_with("src/dashboard.rs") {
                let text = std::fs::read_to_string(&p).unwrap();
                for (n, line) in text.lines().enumerate() {
                    let code = line.split("//").next().unwrap_or("");
                    if [".route(", ".route_service(", ".nest(", ".nest_service("]
                        .iter()
                        .any(|x| code.contains(x))
                    {
                        found.push(format!("{}:{}: {}", p.display(), n + 1, line.trim()));
                    }
                }
            }
        }
    }
    assert!(found.is_empty(), "routes outside routes!(...):\n{}", found.join("\n"));
}
