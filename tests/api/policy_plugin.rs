//! The decision engine is a trait: another implementation plugs in without touching the
//! rest (the README shows this same policy).

use std::sync::Arc;

use serde_json::json;
use verigate::{
    events::{Action, VerificationRequestEvent},
    policy::{Policy, PolicyDecision, PolicyError},
};

use crate::helpers::*;

struct AllowEurope;

impl Policy for AllowEurope {
    fn decide(
        &self,
        req: &VerificationRequestEvent,
        _history: verigate::policy::NumberHistory,
        _now: chrono::DateTime<chrono::Utc>,
    ) -> Result<PolicyDecision, PolicyError> {
        let european = ["+3", "+4"]
            .iter()
            .any(|p| req.identity.endpoint.starts_with(p));
        let action = if european {
            Action::Allow
        } else {
            Action::Deny
        };
        Ok(PolicyDecision::new(
            action,
            Some("europe-only"),
            "served region",
        ))
    }

    fn on_error(&self) -> Action {
        Action::Deny
    }

    fn version(&self) -> String {
        "europe-only-1".into()
    }
}

#[tokio::test]
async fn a_plugged_in_policy_decides_and_is_recorded() {
    let app = spawn_app_with_policy(Arc::new(AllowEurope)).await;
    for (id, number, expected) in [
        ("eu", "+46700000001", "allow"),
        ("us", "+12125550123", "deny"),
    ] {
        let reply = app.post_callback(&request_event(id, "sms", number)).await;
        assert_eq!(reply.json(), json!({ "action": expected }));
    }
    let record = app.record("us").await.unwrap();
    assert_eq!(record["decision"]["rule"], "europe-only");
    assert_eq!(record["decision"]["policy_version"], "europe-only-1");
}
