//! A decision engine of your own, plugged into the full verigate server: signing checks,
//! durable records, the query API, metrics and readiness stay as they are; only allow /
//! deny is yours. This one serves Europe only and never lets international-network
//! numbers (+881, +882, +883) through.
//!
//! ```sh
//! VERIGATE_APP_KEY=... VERIGATE_APP_SECRET=... cargo run --release --example custom_policy
//! ```
//!
//! It reads the same settings as `verigate` (config/default.toml, `--config` is not
//! parsed here, `VERIGATE__SECTION__KEY` variables are). A policy needs `decide`,
//! `on_error` and `version`; `describe`, `reload`, `bounded`, and the `Learning` and
//! `Quarantines` extensions are optional.

use chrono::{DateTime, Utc};
use verigate::{
    clock::Clock,
    config::Settings,
    events::{Action, VerificationRequestEvent},
    policy::{NumberHistory, Policy, PolicyDecision, PolicyError},
    startup::Application,
    telemetry,
};

struct EuropeOnly;

impl EuropeOnly {
    const INTERNATIONAL_NETWORKS: [&'static str; 3] = ["+881", "+882", "+883"];
}

impl Policy for EuropeOnly {
    fn decide(
        &self,
        request: &VerificationRequestEvent,
        _history: NumberHistory,
        _now: DateTime<Utc>,
    ) -> Result<PolicyDecision, PolicyError> {
        let number = request.identity.endpoint.as_str();
        let (action, rule) = if Self::INTERNATIONAL_NETWORKS
            .iter()
            .any(|p| number.starts_with(p))
        {
            (Action::Deny, "international-network")
        } else if number.starts_with("+3") || number.starts_with("+4") {
            (Action::Allow, "europe")
        } else {
            (Action::Deny, "outside-europe")
        };
        Ok(PolicyDecision::new(
            action,
            Some(rule),
            format!("rule `{rule}`"),
        ))
    }

    fn on_error(&self) -> Action {
        Action::Deny
    }

    fn version(&self) -> String {
        "europe-only-1".into()
    }

    /// Prefix checks in memory: safe to run on the HTTP worker itself.
    fn bounded(&self) -> bool {
        true
    }
}

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load(None)?;
    let (writer, _log_writer) = telemetry::background_stdout();
    telemetry::init(telemetry::subscriber(
        &settings.log.level,
        settings.log.format,
        false,
        writer,
    ))?;
    let app = Application::build_with_policy(
        &settings,
        Clock::system(),
        std::sync::Arc::new(EuropeOnly),
    )?;
    tracing::info!(
        port = app.port(),
        "verigate listening with the europe-only policy"
    );
    app.run_until_stopped().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(number: &str) -> VerificationRequestEvent {
        serde_json::from_value(serde_json::json!({
            "id": "1",
            "event": "VerificationRequestEvent",
            "method": "sms",
            "identity": { "type": "number", "endpoint": number },
        }))
        .unwrap()
    }

    #[test]
    fn serves_europe_and_never_international_networks() {
        let decide = |n: &str| {
            EuropeOnly
                .decide(&request(n), NumberHistory::New, Utc::now())
                .unwrap()
        };
        assert_eq!(decide("+46700000001").action, Action::Allow);
        assert_eq!(decide("+14155550100").action, Action::Deny);
        let satellite = decide("+88216000000");
        assert_eq!(satellite.action, Action::Deny);
        assert_eq!(satellite.rule.as_deref(), Some("international-network"));
    }
}
