//! Logging: one subscriber for the process (pretty or JSON), one root span per request,
//! and [`MaskedNumber`] so phone numbers never reach a log in full.

use std::fmt;

use actix_web::{
    body::MessageBody,
    dev::{ServiceRequest, ServiceResponse},
    Error, HttpMessage,
};
use tracing::span::Record;
use tracing::{Span, Subscriber};
use tracing_actix_web::{DefaultRootSpanBuilder, RootSpanBuilder};
use tracing_subscriber::{
    field::RecordFields,
    fmt::{
        format::{JsonFields, Writer},
        FormatFields, FormattedFields, MakeWriter,
    },
    layer::SubscriberExt,
    EnvFilter, Registry,
};

use crate::config::LogFormat;

/// Builds the subscriber; `sink` lets tests silence or capture output. `colour` only
/// applies to the pretty format (turn it off when the sink is not a terminal).
pub fn subscriber<W>(
    level: &str,
    format: LogFormat,
    colour: bool,
    sink: W,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let registry = Registry::default().with(filter);
    match format {
        LogFormat::Json => Box::new(
            registry.with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .fmt_fields(AppendJsonFields)
                    .with_writer(sink),
            ),
        ),
        LogFormat::Pretty => Box::new(
            registry.with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(colour)
                    .with_writer(sink),
            ),
        ),
    }
}

/// JSON span fields that grow by appending.
///
/// tracing-subscriber's own JSON fields re-parse and re-serialise a span's fields every
/// time one more is recorded; a callback records about ten, one at a time, and that cost
/// was a tenth of verigate's CPU under load. A field recorded twice appears twice; the
/// JSON event formatter reads them into a map, where the last one wins.
pub struct AppendJsonFields;

impl<'writer> FormatFields<'writer> for AppendJsonFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        JsonFields::new().format_fields(writer, fields)
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &Record<'_>,
    ) -> fmt::Result {
        let mut added = String::new();
        JsonFields::new().format_fields(Writer::new(&mut added), fields)?;
        match (current.fields.strip_suffix('}'), added.strip_prefix('{')) {
            (Some(head), Some(tail)) if head.len() > 1 && tail.len() > 1 => {
                current.fields = format!("{head},{tail}");
            }
            (_, Some(tail)) if tail.len() > 1 => current.fields = added,
            _ => {}
        }
        Ok(())
    }
}

/// Installs the subscriber for the process. Call once.
pub fn init(subscriber: Box<dyn Subscriber + Send + Sync>) -> anyhow::Result<()> {
    tracing::subscriber::set_global_default(subscriber)?;
    Ok(())
}

/// The root span of every request: the HTTP fields tracing-actix-web records, plus the
/// callback facts handlers fill in as they learn them.
pub struct CallbackRootSpan;

impl RootSpanBuilder for CallbackRootSpan {
    /// The fields tracing-actix-web's `root_span!` records, except that `http.target` is
    /// the path only: query strings (`?number=…`) carry personal data.
    fn on_request_start(request: &ServiceRequest) -> Span {
        let route = request
            .match_pattern()
            .unwrap_or_else(|| "unmatched".into());
        let method = request.method().as_str();
        let request_id = request
            .extensions()
            .get::<tracing_actix_web::RequestId>()
            .map(ToString::to_string)
            .unwrap_or_default();
        let user_agent = request
            .headers()
            .get("user-agent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        tracing::info_span!(
            "HTTP request",
            http.method = %method,
            http.route = %route,
            http.target = %request.path(),
            http.user_agent = %user_agent,
            http.client_ip = %request.connection_info().realip_remote_addr().unwrap_or(""),
            http.status_code = tracing::field::Empty,
            otel.name = %format!("{method} {route}"),
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            request_id = %request_id,
            exception.message = tracing::field::Empty,
            exception.details = tracing::field::Empty,
            verification_id = tracing::field::Empty,
            event = tracing::field::Empty,
            method = tracing::field::Empty,
            number = tracing::field::Empty,
            app_key = tracing::field::Empty,
            decision = tracing::field::Empty,
            rule = tracing::field::Empty,
            error_code = tracing::field::Empty,
        )
    }

    fn on_request_end<B: MessageBody>(span: Span, outcome: &Result<ServiceResponse<B>, Error>) {
        DefaultRootSpanBuilder::on_request_end(span, outcome);
    }
}

/// Displays a phone number with only its country calling code and last two digits,
/// e.g. `+46*******01`. Numbers are personal data: logs get this, never the number.
pub struct MaskedNumber<'a>(pub &'a str);

impl fmt::Display for MaskedNumber<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digits: Vec<char> = self.0.chars().filter(char::is_ascii_digit).collect();
        if digits.len() < 6 {
            return f.write_str("+***");
        }
        let keep_front = calling_code_len(&digits);
        let keep_back = 2;
        f.write_str("+")?;
        for (i, c) in digits.iter().enumerate() {
            if i < keep_front || i >= digits.len() - keep_back {
                write!(f, "{c}")?;
            } else {
                f.write_str("*")?;
            }
        }
        Ok(())
    }
}

/// Replaces every run of six or more digits (with an optional leading `+`) by `+***`, for
/// log messages that may quote request data (parser errors quote the offending value).
pub fn redact_numbers(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        let digits = run.chars().filter(char::is_ascii_digit).count();
        out.push_str(if digits >= 6 { "+***" } else { run.as_str() });
        run.clear();
    };
    for c in text.chars() {
        if c.is_ascii_digit() || (c == '+' && run.is_empty()) {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

/// Length of the ITU-T E.164 country calling code that starts `digits` (1 to 3 digits).
fn calling_code_len(digits: &[char]) -> usize {
    let two: String = digits.iter().take(2).collect();
    match digits.first() {
        Some('1') | Some('7') => 1,
        _ => match two.as_str() {
            "20" | "27" | "30" | "31" | "32" | "33" | "34" | "36" | "39" | "40" | "41" | "43"
            | "44" | "45" | "46" | "47" | "48" | "49" | "51" | "52" | "53" | "54" | "55" | "56"
            | "57" | "58" | "60" | "61" | "62" | "63" | "64" | "65" | "66" | "81" | "82" | "84"
            | "86" | "90" | "91" | "92" | "93" | "94" | "95" | "98" => 2,
            _ => 3,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_keep_only_calling_code_and_last_two_digits() {
        assert_eq!(MaskedNumber("+46700000001").to_string(), "+46*******01");
        assert_eq!(MaskedNumber("+12125550123").to_string(), "+1********23");
        assert_eq!(MaskedNumber("+8825551234").to_string(), "+882*****34");
        assert_eq!(MaskedNumber("+123").to_string(), "+***");
        assert_eq!(MaskedNumber("not a number").to_string(), "+***");
    }

    #[test]
    fn long_digit_runs_are_redacted_from_messages() {
        assert_eq!(
            redact_numbers(
                "invalid type: integer `46700000001`, expected a string at line 1 column 80"
            ),
            "invalid type: integer `+***`, expected a string at line 1 column 80"
        );
        assert_eq!(
            redact_numbers("number \"+46700000001\" 12345 +1"),
            "number \"+***\" 12345 +1"
        );
    }

    /// A sink the test can read back.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn span_fields_recorded_one_by_one_all_reach_the_json_line() {
        let sink = Captured::default();
        let writer = sink.clone();
        let subscriber = subscriber("info", LogFormat::Json, false, move || writer.clone());
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "callback",
                a = 1,
                b = tracing::field::Empty,
                c = tracing::field::Empty,
                quoted = tracing::field::Empty
            );
            span.record("b", "two");
            span.record("c", 3.5);
            span.record("quoted", "say \"hi\", {ok}");
            span.record("b", "last wins");
            span.in_scope(|| tracing::info!(answer = 42, "done"));
        });
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        let span = &line["span"];
        assert_eq!(span["a"], 1);
        assert_eq!(span["b"], "last wins");
        assert_eq!(span["c"], 3.5);
        assert_eq!(span["quoted"], "say \"hi\", {ok}");
        assert_eq!(line["answer"], 42);
    }

    proptest::proptest! {
        #[test]
        fn a_masked_number_shows_only_calling_code_and_last_two(n in "\\+[1-9][0-9]{7,14}") {
            let masked = MaskedNumber(&n).to_string();
            proptest::prop_assert_eq!(masked.len(), n.len());
            let hidden = masked.chars().filter(|c| *c == '*').count();
            // At most a 3-digit calling code and 2 trailing digits stay visible.
            proptest::prop_assert!(hidden >= n.len() - 1 - 5);
            proptest::prop_assert!(masked.ends_with(&n[n.len() - 2..]));
            proptest::prop_assert!(masked[1..].trim_start_matches(|c: char| c.is_ascii_digit()).starts_with('*'));
        }
    }
}
