//! Adaptive rules over HTTP: a range that never converts is quarantined; operators list,
//! pin and lift blocks; blocks and what the rules learned survive a restart.

use serde_json::Value;

use crate::helpers::*;

const READ_TOKEN: &str = "read-only-token-0123456789";

pub const RULE: &str = r#"
[[rule]]
name = "low-conversion"
action = "deny"
conversion = { per = "range:3", window = "6h", min_samples = 5, below = 0.5 }
block_for = "1h"
"#;

async fn send(app: &TestApp, method: reqwest::Method, path: &str, token: &str) -> Reply {
    api_call(&app.client, &app.address, method, path, token).await
}

/// Five verifications in the range of `prefix` (8 digits after `+`) that never complete.
async fn failing_range(app: &TestApp, prefix: &str) {
    for k in 0..5 {
        let id = format!("{prefix}-{k}");
        let number = format!("+{prefix}00{k}");
        let reply = app.post_callback(&request_event(&id, "sms", &number)).await;
        assert_eq!(reply.json()["action"], "allow", "{id}");
        assert_eq!(
            app.post_callback(&result_event(&id, "FAIL")).await.status,
            200
        );
    }
}

async fn action_for(app: &TestApp, id: &str, number: &str) -> String {
    let reply = app.post_callback(&request_event(id, "sms", number)).await;
    reply.json()["action"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_range_that_never_converts_is_quarantined_listed_pinned_and_lifted() {
    let app = spawn_app_with(|s| s.api.read_token = Some(READ_TOKEN.to_owned().into())).await;
    // Only this rule, so the sample policy's own adaptive rules stay out of the way.
    let path = app.settings.policy.path.clone();
    std::fs::write(
        &path,
        format!("default = \"allow\"\non_error = \"deny\"\n{RULE}"),
    )
    .unwrap();
    let reload = send(&app, reqwest::Method::POST, "/v1/policy/reload", API_TOKEN).await;
    assert_eq!(reload.status, 200, "{}", reload.text);

    failing_range(&app, "22507123").await;
    assert_eq!(action_for(&app, "next-1", "+22507123999").await, "deny");
    let record = app.record("next-1").await.unwrap();
    assert_eq!(record["decision"]["rule"], "low-conversion");
    assert_eq!(
        record["decision"]["explanation"]["quarantine"]["state"],
        "tripped"
    );
    // Another range is untouched.
    assert_eq!(action_for(&app, "other-1", "+22507124999").await, "allow");

    let listed = send(&app, reqwest::Method::GET, "/v1/policy/blocks", READ_TOKEN).await;
    let blocks = listed.json()["blocks"].as_array().unwrap().clone();
    assert_eq!(blocks.len(), 1, "{}", listed.text);
    assert_eq!(blocks[0]["key"], "+22507123");
    assert_eq!(blocks[0]["rule"], "low-conversion");
    assert_eq!(blocks[0]["strikes"], 1);
    assert_eq!(blocks[0]["evidence"].as_array().unwrap().len(), 5);
    assert_eq!(blocks[0]["evidence"][0]["id"], "22507123-0");
    assert!(!listed.text.contains("+22507123000"), "full numbers listed");
    assert_eq!(app.metric("verigate_policy_blocks").await, 1.0);
    assert_eq!(
        app.metric("verigate_policy_block_changes_total{change=\"blocked\"}")
            .await,
        1.0
    );

    // Changing a block needs the admin token.
    let key = "/v1/policy/blocks/+22507123";
    let refused = send(&app, reqwest::Method::DELETE, key, READ_TOKEN).await;
    assert_eq!(
        (refused.status, refused.error_code().as_str()),
        (403, "forbidden")
    );
    let pinned = send(
        &app,
        reqwest::Method::POST,
        &format!("{key}/pin"),
        API_TOKEN,
    )
    .await;
    assert_eq!(pinned.status, 200, "{}", pinned.text);
    assert!(pinned.json()["pinned"][0]["until"].is_null());

    // Both the pinned block and what the rule learned about another range survive.
    failing_range(&app, "22507125").await;
    let app = app.restart().await;
    let after = send(&app, reqwest::Method::GET, "/v1/policy/blocks", API_TOKEN).await;
    assert_eq!(
        after.json()["blocks"],
        serde_json::json!(blocks_with_until_null(&blocks))
    );
    assert_eq!(action_for(&app, "next-2", "+22507123998").await, "deny");
    assert_eq!(action_for(&app, "relearned", "+22507125999").await, "deny");
    let record = app.record("relearned").await.unwrap();
    assert_eq!(
        record["decision"]["explanation"]["quarantine"]["state"],
        "tripped"
    );

    let lifted = send(&app, reqwest::Method::DELETE, key, API_TOKEN).await;
    assert_eq!(lifted.status, 200, "{}", lifted.text);
    assert_eq!(action_for(&app, "next-3", "+22507123997").await, "allow");
    let again = send(&app, reqwest::Method::DELETE, key, API_TOKEN).await;
    assert_eq!(
        (again.status, again.error_code().as_str()),
        (404, "not_found")
    );
}

/// The listed blocks as they look once pinned (and after one more blocked request).
fn blocks_with_until_null(blocks: &[Value]) -> Vec<Value> {
    blocks
        .iter()
        .map(|b| {
            let mut b = b.clone();
            b["until"] = Value::Null;
            b
        })
        .collect()
}

#[tokio::test]
async fn keys_that_shadow_rules_would_deny_are_listed_for_operators() {
    let app = spawn_app_with(|s| s.api.read_token = Some(READ_TOKEN.to_owned().into())).await;
    let path = app.settings.policy.path.clone();
    std::fs::write(
        &path,
        "default = \"allow\"\non_error = \"deny\"\n\
         [[rule]]\nname = \"range-watch\"\naction = \"deny\"\nmode = \"shadow\"\n\
         rate_limit = { key = \"range:3\", max = 2, window = \"1h\" }\n\
         [[rule]]\nname = \"number-watch\"\naction = \"deny\"\nmode = \"shadow\"\n\
         rate_limit = { key = \"number\", max = 1, window = \"1h\" }\n\
         [[rule]]\nname = \"night\"\naction = \"deny\"\nmode = \"shadow\"\nmethod = [\"sms\"]\n",
    )
    .unwrap();
    let reload = send(&app, reqwest::Method::POST, "/v1/policy/reload", API_TOKEN).await;
    assert_eq!(reload.status, 200, "{}", reload.text);
    let empty = send(&app, reqwest::Method::GET, "/v1/policy/flagged", READ_TOKEN).await;
    assert_eq!(empty.json(), serde_json::json!({ "flagged": [] }));

    // Four requests in one range, two of them from one number: all allowed (shadow).
    for (i, number) in [
        "+46701234501",
        "+46701234502",
        "+46701234503",
        "+46701234503",
    ]
    .iter()
    .enumerate()
    {
        assert_eq!(
            action_for(&app, &format!("flag-{i}"), number).await,
            "allow"
        );
    }
    let listed = send(&app, reqwest::Method::GET, "/v1/policy/flagged", READ_TOKEN).await;
    assert_eq!(listed.status, 200, "{}", listed.text);
    let flagged = listed.json()["flagged"].as_array().unwrap().clone();
    let entry = |rule: &str| {
        flagged
            .iter()
            .find(|f| f["rule"] == rule)
            .unwrap_or_else(|| panic!("{rule} in {flagged:?}"))
            .clone()
    };
    let range = entry("range-watch");
    assert_eq!(range["key"], "+46701234");
    assert_eq!(range["would"], "deny");
    assert_eq!(range["matches"], 2, "the third and fourth requests");
    assert!(
        range["reading"]
            .as_str()
            .unwrap()
            .contains("= 4.000 (limit 2.000)"),
        "{range}"
    );
    // A number is personal data: listed masked.
    let number = entry("number-watch");
    assert_eq!(number["key"], "+46*******03");
    assert_eq!(number["matches"], 1);
    // A shadow rule on the request alone has no key to list.
    assert!(flagged.iter().all(|f| f["rule"] != "night"), "{flagged:?}");
    assert_eq!(flagged.len(), 2);

    let anonymous = app
        .client
        .get(format!("{}/v1/policy/flagged", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status().as_u16(), 401);
}
