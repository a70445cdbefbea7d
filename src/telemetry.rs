//! Logging: one subscriber for the process (pretty or JSON), one root span per request,
//! and [`MaskedNumber`] so phone numbers never reach a log in full.

use std::fmt;

use actix_web::{
    body::MessageBody,
    dev::{ServiceRequest, ServiceResponse},
    Error, HttpMessage,
};
use tracing::{
    field::{Field, Visit},
    span::Record,
    Event, Span, Subscriber,
};
use tracing_actix_web::{DefaultRootSpanBuilder, RootSpanBuilder};
use tracing_subscriber::{
    field::RecordFields,
    fmt::{format::Writer, FmtContext, FormatEvent, FormatFields, FormattedFields, MakeWriter},
    layer::SubscriberExt,
    registry::LookupSpan,
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
                    .event_format(JsonLine)
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

/// Span fields as a JSON object that grows by appending.
///
/// tracing-subscriber's own JSON fields re-parse and re-serialise a span's fields every
/// time one more is recorded; a callback records about ten, one at a time, and that cost
/// was a tenth of verigate's CPU under load. A field recorded twice appears twice; JSON
/// readers keep the last.
pub struct AppendJsonFields;

impl<'writer> FormatFields<'writer> for AppendJsonFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut members = String::new();
        fields.record(&mut JsonMembers::new(&mut members, false));
        if members.is_empty() {
            return Ok(());
        }
        writer.write_char('{')?;
        writer.write_str(&members)?;
        writer.write_char('}')
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &Record<'_>,
    ) -> fmt::Result {
        let mut added = String::new();
        fields.record(&mut JsonMembers::new(&mut added, false));
        if added.is_empty() {
            return Ok(());
        }
        let so_far = &mut current.fields;
        if so_far.len() > 2 && so_far.ends_with('}') {
            so_far.pop();
            so_far.push(',');
        } else {
            so_far.clear();
            so_far.push('{');
        }
        so_far.push_str(&added);
        so_far.push('}');
        Ok(())
    }
}

/// One JSON object per line: timestamp, level, the event's fields, target, and the
/// current span's fields as `span`. The span's fields are already JSON
/// ([`AppendJsonFields`]) and are copied in as they are.
pub struct JsonLine;

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        use std::fmt::Write as _;
        let meta = event.metadata();
        let mut line = String::with_capacity(512);
        line.push_str("{\"timestamp\":\"");
        write!(
            line,
            "{}",
            chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.6fZ")
        )?;
        line.push_str("\",\"level\":\"");
        line.push_str(meta.level().as_str());
        line.push('"');
        event.record(&mut JsonMembers::new(&mut line, true));
        line.push_str(",\"target\":");
        json_string(&mut line, meta.target());
        if let Some(span) = ctx.lookup_current() {
            line.push_str(",\"span\":{");
            let extensions = span.extensions();
            let fields = extensions
                .get::<FormattedFields<N>>()
                .and_then(|f| f.fields.strip_prefix('{')?.strip_suffix('}'))
                .filter(|f| !f.is_empty());
            if let Some(fields) = fields {
                line.push_str(fields);
                line.push(',');
            }
            line.push_str("\"name\":");
            json_string(&mut line, span.name());
            line.push('}');
        }
        line.push_str("}\n");
        writer.write_str(&line)
    }
}

/// Writes each visited field as a JSON member (`"name":value`), separated by commas.
struct JsonMembers<'a> {
    out: &'a mut String,
    /// Put a comma before the next member.
    comma: bool,
}

impl<'a> JsonMembers<'a> {
    fn new(out: &'a mut String, comma: bool) -> Self {
        Self { out, comma }
    }

    fn name(&mut self, field: &Field) {
        if self.comma {
            self.out.push(',');
        }
        self.comma = true;
        json_string(self.out, field.name());
        self.out.push(':');
    }

    fn raw(&mut self, field: &Field, value: impl fmt::Display) {
        use std::fmt::Write as _;
        self.name(field);
        let _ = write!(self.out, "{value}");
    }
}

impl Visit for JsonMembers<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        use std::fmt::Write as _;
        self.name(field);
        self.out.push('"');
        let _ = write!(JsonEscaped(self.out), "{value:?}");
        self.out.push('"');
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.name(field);
        json_string(self.out, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.raw(field, value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.raw(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.raw(field, value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if value.is_finite() {
            self.raw(field, value);
        } else {
            self.record_str(field, &value.to_string());
        }
    }
}

/// A JSON string literal of `s`.
fn json_string(out: &mut String, s: &str) {
    use std::fmt::Write as _;
    out.push('"');
    let _ = JsonEscaped(out).write_str(s);
    out.push('"');
}

/// Escapes what it is given for the inside of a JSON string.
struct JsonEscaped<'a>(&'a mut String);

impl fmt::Write for JsonEscaped<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Copy runs that need no escaping in one go: most text has none.
        let mut clean = 0;
        for (i, b) in s.bytes().enumerate() {
            let escaped = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..=0x1f => "",
                _ => continue,
            };
            self.0.push_str(&s[clean..i]);
            if escaped.is_empty() {
                write!(self.0, "\\u{b:04x}")?;
            } else {
                self.0.push_str(escaped);
            }
            clean = i + 1;
        }
        self.0.push_str(&s[clean..]);
        Ok(())
    }
}

/// Log lines that may wait for the output; past that, lines are dropped and counted
/// rather than slowing down callbacks (Sinch waits for our answers, not for our logs).
const LOG_BUFFER_LINES: usize = 128 * 1024;
/// How long the writer thread lets lines gather before it writes them out.
const LOG_GATHER: std::time::Duration = std::time::Duration::from_millis(10);

static DROPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Lines waiting for the writer thread.
#[derive(Default)]
struct Gathered {
    bytes: Vec<u8>,
    lines: usize,
    stop: bool,
}

#[derive(Default)]
struct LogQueue {
    gathered: std::sync::Mutex<Gathered>,
    /// Wakes the writer when the first line arrives after a write-out, or to stop.
    arrived: std::sync::Condvar,
}

impl LogQueue {
    fn gathered(&self) -> std::sync::MutexGuard<'_, Gathered> {
        self.gathered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Where log lines go: appended to a buffer that a background thread writes out every
/// [`LOG_GATHER`], so that HTTP workers never wait on a slow terminal or log pipe, and
/// a line costs a lock and a copy, not a wakeup of another thread.
#[derive(Clone)]
pub struct BackgroundOutput {
    queue: std::sync::Arc<LogQueue>,
}

/// One write of the fmt layer: one formatted line.
pub struct LineWriter<'a>(&'a LogQueue);

impl std::io::Write for LineWriter<'_> {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut gathered = self.0.gathered();
        if gathered.lines >= LOG_BUFFER_LINES {
            DROPPED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(line.len());
        }
        let first = gathered.bytes.is_empty();
        gathered.bytes.extend_from_slice(line);
        gathered.lines += 1;
        drop(gathered);
        if first {
            self.0.arrived.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BackgroundOutput {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter(&self.queue)
    }
}

/// Keeps the writer thread; dropping it writes out what is still gathered and stops it.
pub struct LogOutputGuard {
    queue: std::sync::Arc<LogQueue>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for LogOutputGuard {
    fn drop(&mut self) {
        self.queue.gathered().stop = true;
        self.queue.arrived.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Standard output through a background thread. Keep the guard until the process ends.
pub fn background_stdout() -> (BackgroundOutput, LogOutputGuard) {
    background_output(std::io::stdout())
}

/// Log lines written to `out` by a background thread (see [`BackgroundOutput`]).
pub fn background_output<W: std::io::Write + Send + 'static>(
    mut out: W,
) -> (BackgroundOutput, LogOutputGuard) {
    let queue = std::sync::Arc::new(LogQueue::default());
    let shared = std::sync::Arc::clone(&queue);
    let thread = std::thread::Builder::new()
        .name("verigate-log".into())
        .spawn(move || {
            let mut spare: Vec<u8> = Vec::new();
            loop {
                let stop = {
                    let mut gathered = shared.gathered();
                    while gathered.bytes.is_empty() && !gathered.stop {
                        gathered = shared
                            .arrived
                            .wait(gathered)
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                    }
                    gathered.stop
                };
                if !stop {
                    // Let the lines of the next few milliseconds join the write.
                    std::thread::sleep(LOG_GATHER);
                }
                {
                    let mut gathered = shared.gathered();
                    spare.clear();
                    std::mem::swap(&mut gathered.bytes, &mut spare);
                    gathered.lines = 0;
                }
                // Nowhere to say that the log output failed but the log itself.
                let _ = out.write_all(&spare).and_then(|()| out.flush());
                if stop {
                    return;
                }
            }
        })
        .ok();
    let guard = LogOutputGuard {
        queue: std::sync::Arc::clone(&queue),
        thread,
    };
    (BackgroundOutput { queue }, guard)
}

/// Log lines dropped so far because the output could not keep up.
pub fn log_lines_dropped() -> u64 {
    DROPPED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Says so in the log, every `every`, when lines were dropped since the last look: a
/// count in /metrics alone is easy to miss.
pub async fn report_dropped_lines(every: std::time::Duration) {
    let mut reported = log_lines_dropped();
    loop {
        tokio::time::sleep(every).await;
        let now = log_lines_dropped();
        if now > reported {
            tracing::warn!(
                dropped = now - reported,
                total = now,
                "log lines were dropped: the log output is slower than verigate (see verigate_log_lines_dropped_total)"
            );
            reported = now;
        }
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
    /// Most of the fields tracing-actix-web's `root_span!` records (not its OpenTelemetry
    /// ones: verigate exports none), except that `http.target` is the path only: query
    /// strings (`?number=…`) carry personal data.
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
        tracing::info_span!(
            "HTTP request",
            http.method = method,
            http.route = &*route,
            http.target = request.path(),
            http.client_ip = request.connection_info().realip_remote_addr().unwrap_or(""),
            http.status_code = tracing::field::Empty,
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

    /// Output the test reads back, and can hold up (as a stuck log pipe would).
    #[derive(Clone, Default)]
    struct Pipe {
        written: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
        stuck: std::sync::Arc<std::sync::Mutex<()>>,
    }

    impl std::io::Write for Pipe {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            let _held_up = self.stuck.lock().unwrap();
            self.written.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn background_output_writes_every_line_in_order_and_the_guard_writes_out_the_rest() {
        use std::io::Write as _;
        let pipe = Pipe::default();
        let (output, guard) = background_output(pipe.clone());
        for i in 0..1000 {
            output
                .make_writer()
                .write_all(format!("line {i}\n").as_bytes())
                .unwrap();
        }
        drop(guard);
        let written = String::from_utf8(pipe.written.lock().unwrap().clone()).unwrap();
        let expected: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(written, expected);
    }

    #[test]
    fn a_stuck_output_drops_lines_past_the_limit_and_counts_them_instead_of_waiting() {
        use std::io::Write as _;
        let pipe = Pipe::default();
        let stuck = pipe.stuck.lock().unwrap();
        let (output, guard) = background_output(pipe.clone());
        let before = log_lines_dropped();
        let started = std::time::Instant::now();
        // The writer thread takes the first lines and then waits on the stuck pipe;
        // the rest fill the buffer and then go.
        for _ in 0..(2 * LOG_BUFFER_LINES + 10) {
            output.make_writer().write_all(b"x\n").unwrap();
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        let dropped = log_lines_dropped() - before;
        assert!(dropped >= 10, "{dropped} dropped");
        drop(stuck);
        drop(guard);
        let written = pipe.written.lock().unwrap().len() / 2;
        assert_eq!(written as u64 + dropped, 2 * LOG_BUFFER_LINES as u64 + 10);
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
    fn awkward_values_are_escaped_into_valid_json() {
        let sink = Captured::default();
        let writer = sink.clone();
        let subscriber = subscriber("info", LogFormat::Json, false, move || writer.clone());
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("req", path = "a\"b\\c\nd\u{1}");
            span.in_scope(|| {
                tracing::info!(
                    nan = f64::NAN,
                    neg = -3,
                    big = u64::MAX,
                    yes = true,
                    text = %"tab\there",
                    "message with \"quotes\" and \u{7f}"
                )
            });
            tracing::warn!("outside any span");
        });
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        assert_eq!(lines[0]["span"]["path"], "a\"b\\c\nd\u{1}");
        assert_eq!(lines[0]["span"]["name"], "req");
        assert_eq!(lines[0]["nan"], "NaN");
        assert_eq!(lines[0]["neg"], -3);
        assert_eq!(lines[0]["big"], u64::MAX);
        assert_eq!(lines[0]["yes"], true);
        assert_eq!(lines[0]["text"], "tab\there");
        assert_eq!(lines[0]["message"], "message with \"quotes\" and \u{7f}");
        assert_eq!(lines[0]["level"], "INFO");
        assert_eq!(lines[0]["target"], module_path!());
        assert!(lines[0]["timestamp"].as_str().unwrap().ends_with('Z'));
        assert!(lines[1].get("span").is_none());
        assert_eq!(lines[1]["level"], "WARN");
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

/// Lets a message through at most once per interval, and counts what it held back, so
/// that an outage is logged once every few seconds instead of once per request.
pub struct OncePer {
    interval_ms: i64,
    last_ms: std::sync::atomic::AtomicI64,
    held_back: std::sync::atomic::AtomicU64,
}

impl OncePer {
    pub const fn new(interval: std::time::Duration) -> Self {
        Self {
            interval_ms: interval.as_millis() as i64,
            last_ms: std::sync::atomic::AtomicI64::new(i64::MIN),
            held_back: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(n)` when the message is due now, `n` being how many were held back since
    /// the last one; `None` to keep quiet.
    pub fn due(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let now = chrono::Utc::now().timestamp_millis();
        let last = self.last_ms.load(Relaxed);
        let due = now.saturating_sub(last) >= self.interval_ms
            && self
                .last_ms
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok();
        if due {
            Some(self.held_back.swap(0, Relaxed))
        } else {
            self.held_back.fetch_add(1, Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod once_per_tests {
    use super::OncePer;

    #[test]
    fn lets_one_through_per_interval_and_counts_the_rest() {
        let gate = OncePer::new(std::time::Duration::from_secs(3600));
        assert_eq!(gate.due(), Some(0));
        assert_eq!(gate.due(), None);
        assert_eq!(gate.due(), None);
        let open = OncePer::new(std::time::Duration::ZERO);
        assert_eq!(open.due(), Some(0));
        assert_eq!(open.due(), Some(0));
    }
}
