//! A corpus of hostile input, each case answered with its documented status and JSON
//! error code, nothing stored for any refused one, and the service answering after all.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use chrono::Utc;
use serde_json::Value;

use crate::helpers::*;

const PATH: &str = "/sinch/verification";

/// How a hostile case reaches the server.
enum Attack {
    /// A body signed correctly: only its content is hostile.
    Signed(Vec<u8>),
    /// A correctly signed body whose headers are then replaced or added.
    SignedThen(Vec<u8>, Vec<(&'static str, String)>),
    /// A body signed with this `x-timestamp` value.
    SignedAt(Vec<u8>, String),
    /// A GET on the query API with the right token.
    Query(String),
}

struct Case {
    name: &'static str,
    attack: Attack,
    /// 200 with code "deny": an authentic request event the policy cannot decide, which
    /// gets the policy's `on_error` answer (deny in the sample policy).
    status: u16,
    code: &'static str,
}

fn signed(name: &'static str, body: impl Into<Vec<u8>>, status: u16, code: &'static str) -> Case {
    Case {
        name,
        attack: Attack::Signed(body.into()),
        status,
        code,
    }
}

fn headers(
    name: &'static str,
    body: &str,
    replaced: Vec<(&'static str, String)>,
    code: &'static str,
) -> Case {
    Case {
        name,
        attack: Attack::SignedThen(body.as_bytes().to_vec(), replaced),
        status: 401,
        code,
    }
}

fn stamped(name: &'static str, body: &str, ts: &str, code: &'static str) -> Case {
    Case {
        name,
        attack: Attack::SignedAt(body.as_bytes().to_vec(), ts.to_owned()),
        status: 401,
        code,
    }
}

fn query(name: &'static str, path: &str, status: u16, code: &'static str) -> Case {
    Case {
        name,
        attack: Attack::Query(path.to_owned()),
        status,
        code,
    }
}

fn request_with_number(number: &str) -> String {
    let id: String = number.chars().filter(char::is_ascii_alphanumeric).collect();
    format!(
        r#"{{"id":"number-{id}","event":"VerificationRequestEvent","method":"sms","identity":{{"type":"number","endpoint":"{number}"}}}}"#
    )
}

fn corpus() -> Vec<Case> {
    let valid = result_event("hostile-valid", "SUCCESSFUL");
    let truncated = &valid[..valid.len() / 2];
    let deep = format!("{}{}", "[".repeat(30_000), "]".repeat(30_000));
    let deep_object = format!(
        r#"{{"id":"deep","event":"VerificationResultEvent","custom":{}1{}}}"#,
        r#"{"a":"#.repeat(5_000),
        "}".repeat(5_000)
    );
    vec![
        signed("truncated JSON", truncated, 400, "malformed_json"),
        signed("deep array nesting", deep, 400, "invalid_event"),
        signed("deep object nesting", deep_object, 400, "invalid_event"),
        signed(
            "10 MB body",
            vec![b' '; 10 * 1024 * 1024],
            413,
            "payload_too_large",
        ),
        signed(
            "invalid UTF-8",
            b"{\"id\":\"\xff\xfe\"}".to_vec(),
            400,
            "malformed_json",
        ),
        signed(
            "NUL bytes",
            b"{\"id\":\"a\0b\",\"event\":\"VerificationResultEvent\"}".to_vec(),
            400,
            "malformed_json",
        ),
        signed(
            "number out of f64 range",
            r#"{"id":"n","event":"VerificationRequestEvent","method":"sms","identity":{"type":"number","endpoint":"+46700000001"},"price":{"amount":1e999,"currencyId":"EUR"}}"#,
            400,
            "invalid_event",
        ),
        signed(
            "integer id of 40 digits",
            r#"{"id":1234567890123456789012345678901234567890,"event":"VerificationResultEvent"}"#,
            400,
            "invalid_event",
        ),
        signed(
            "wrong type for event",
            r#"{"id":"t","event":["VerificationResultEvent"]}"#,
            400,
            "invalid_event",
        ),
        signed(
            "duplicate id key",
            r#"{"id":"first","id":"second","event":"VerificationResultEvent","status":"FAIL"}"#,
            400,
            "invalid_event",
        ),
        signed(
            "duplicate event key",
            r#"{"id":"dup-event","event":"VerificationResultEvent","event":"VerificationRequestEvent","method":"sms"}"#,
            400,
            "invalid_event",
        ),
        // Documented: a missing `+` is added, then the policy decides as usual.
        signed(
            "number without plus",
            request_with_number("46700000001"),
            200,
            "allow",
        ),
        signed(
            "number with leading zero",
            request_with_number("+0046700000001"),
            200,
            "deny",
        ),
        signed(
            "number of 20 digits",
            request_with_number("+12345678901234567890"),
            200,
            "deny",
        ),
        signed(
            "number with letters",
            request_with_number("+4670ABC0001"),
            200,
            "deny",
        ),
        signed(
            "number as a URI",
            request_with_number("tel:+46700000001"),
            200,
            "deny",
        ),
        // A replaced timestamp breaks the signature, which is checked first ...
        headers(
            "timestamp replaced after signing",
            &valid,
            vec![("x-timestamp", "9999-12-31T23:59:59.0000000Z".into())],
            "invalid_signature",
        ),
        // ... so absurd timestamps are signed, as an attacker with the secret would.
        stamped(
            "timestamp in year 9999",
            &valid,
            "9999-12-31T23:59:59.0000000Z",
            "stale_timestamp",
        ),
        stamped(
            "timestamp in year 0",
            &valid,
            "0000-01-01T00:00:00Z",
            "stale_timestamp",
        ),
        stamped(
            "timestamp as epoch seconds",
            &valid,
            "99999999999999999999",
            "invalid_timestamp",
        ),
        stamped(
            "timestamp with a header smuggled after it",
            &valid,
            &format!("{} x-evil: 1", timestamp(Utc::now())),
            "invalid_timestamp",
        ),
        headers(
            "authorization with two signatures",
            &valid,
            vec![("authorization", format!("Application {APP_KEY}:c2ln:c2ln"))],
            "malformed_authorization",
        ),
        headers(
            "authorization of 6000 characters",
            &valid,
            vec![(
                "authorization",
                format!("Application {APP_KEY}:{}", "A".repeat(6000)),
            )],
            "invalid_signature",
        ),
        headers(
            "content type changed after signing",
            &valid,
            vec![(
                "content-type",
                "application/json; charset=utf-8; x=1".into(),
            )],
            "invalid_signature",
        ),
        query(
            "path traversal in number",
            "/v1/verifications?number=../../etc/passwd",
            400,
            "bad_request",
        ),
        query(
            "path traversal in format",
            "/v1/export?format=../../etc/passwd",
            400,
            "bad_request",
        ),
        query(
            "path traversal in cursor",
            "/v1/verifications?cursor=..%2F..%2Fetc%2Fpasswd",
            400,
            "bad_request",
        ),
        query(
            "encoded path traversal in id",
            "/v1/verifications/..%2F..%2Fetc%2Fpasswd",
            404,
            "not_found",
        ),
        query(
            "NUL in a parameter",
            "/v1/verifications?reference=a%00b&limit=1%00",
            400,
            "bad_request",
        ),
        query(
            "absurd time bound",
            "/v1/stats?since=99999-01-01T00:00:00Z",
            400,
            "bad_request",
        ),
    ]
}

async fn send(app: &TestApp, attack: &Attack) -> Reply {
    match attack {
        Attack::Signed(body) => {
            let headers = app.signed_headers(&app.signer, body, PATH);
            app.post_raw(&app.callback_url(), &headers, body.clone())
                .await
        }
        Attack::SignedThen(body, replaced) => {
            let mut headers = app.signed_headers(&app.signer, body, PATH);
            for (name, value) in replaced {
                headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
                headers.push((name.to_string(), value.clone()));
            }
            app.post_raw(&app.callback_url(), &headers, body.clone())
                .await
        }
        Attack::SignedAt(body, ts) => {
            let headers = signed_headers_at(&app.signer, body, PATH, ts);
            app.post_raw(&app.callback_url(), &headers, body.clone())
                .await
        }
        Attack::Query(path) => app.get(path, Some(API_TOKEN)).await,
    }
}

#[tokio::test]
async fn every_hostile_input_gets_its_documented_error_and_nothing_is_stored() {
    let app = spawn_app().await;
    let mut wrong = Vec::new();
    for case in corpus() {
        let reply = send(&app, &case.attack).await;
        let json = serde_json::from_str::<Value>(&reply.text).unwrap_or_default();
        let code = match reply.status {
            200 => json["action"].as_str().unwrap_or_default().to_owned(),
            _ => json["error"]["code"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        };
        if reply.status != case.status || code != case.code {
            wrong.push(format!(
                "{}: expected {} {}, got {} {}",
                case.name,
                case.status,
                case.code,
                reply.status,
                reply.text.chars().take(200).collect::<String>()
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // Nothing that was refused reached the store.
    let accepted =
        "verigate_callbacks_total{event=\"VerificationResultEvent\",outcome=\"accepted\"}";
    assert_eq!(app.metric(accepted).await, 0.0);
    for id in ["first", "second", "dup-event", "n", "deep", "hostile-valid"] {
        assert!(app.record(id).await.is_none(), "{id} was stored");
    }
    // Authentic requests the policy could not decide are recorded with the reason.
    let record = app.record("number-tel46700000001").await.unwrap();
    assert_eq!(record["decision"]["action"], "deny");
    assert_eq!(record["decision"]["on_error"], true);
    // And the service still takes a real callback.
    assert_eq!(
        app.post_callback(&result_event("after", "FAIL"))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn an_unknown_event_type_is_acknowledged_not_refused() {
    // Sinch may add event types; refusing one would only make Sinch retry it.
    let app = spawn_app().await;
    let reply = app
        .post_callback(r#"{"id":"future-1","event":"VerificationSomethingNewEvent","x":1}"#)
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert!(app.record("future-1").await.is_some());
}

#[tokio::test]
async fn malformed_http_is_refused_by_the_server_and_it_keeps_answering() {
    // Requests that are not valid HTTP (a header value with a bare CR, an obsolete
    // folded header line) never reach verigate's handlers: the HTTP parser refuses them.
    let app = spawn_app().await;
    let address = app.address.trim_start_matches("http://").to_owned();
    for raw in [
        "POST /sinch/verification HTTP/1.1\r\nhost: x\r\nx-timestamp: a\rinjected: 1\r\ncontent-length: 2\r\n\r\n{}",
        "POST /sinch/verification HTTP/1.1\r\nhost: x\r\nauthorization: Application k:s\r\n x-folded: 1\r\ncontent-length: 2\r\n\r\n{}",
        "POST /sinch/verification HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}",
    ] {
        let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
        stream.write_all(raw.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            stream.read_to_end(&mut answer),
        )
        .await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "{raw:?} got {answer:?}"
        );
    }
    assert_eq!(
        app.post_callback(&result_event("after-raw", "FAIL"))
            .await
            .status,
        200
    );
}
