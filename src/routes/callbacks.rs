//! `POST <callback_path>`: every Verification callback Sinch sends.
//!
//! Steps: read the body (bounded) → authenticate → parse → for a request event, decide
//! (within the decision deadline) → record durably → answer. Nothing is stored for a
//! callback that fails authentication or parsing, and nothing is acknowledged before it is
//! on disk. A request event always gets an allow/deny answer: when deciding or storing
//! fails, or the policy misses the deadline, the policy's `on_error`.
//!
//! Every path ends in a [`CallbackOutcome`]; `callback_outcome.rs` alone turns it into
//! metrics, span fields, the log line and the answer.

use std::{
    panic::AssertUnwindSafe,
    sync::Arc,
    time::{Duration, Instant},
};

use actix_web::{
    http::header::{self, HeaderMap},
    web::{self, Bytes, BytesMut},
    HttpRequest, HttpResponse,
};
use chrono::{DateTime, Utc};
use futures_util::{FutureExt, StreamExt};
use tracing_actix_web::RootSpan;

use crate::{
    clock::Clock,
    decision::{DecisionRecord, PolicyDecision},
    error::{ApiError, ErrorCode},
    events::{
        CallbackResponse, VerificationEvent, VerificationRequestEvent, VerificationResultEvent,
    },
    metrics::{Metrics, RequestStage},
    policy::{history_of, off_async_workers, BookTaking, NumberHistory, Outcome, Policy},
    signature::{Freshness, Keyring, SignedRequest},
    store::{
        Admission, HistoryAsk, IncomingEvent, OutcomeBookChange, RecordOutcome, Store, StoreError,
        StoreSlot, VerificationRecord,
    },
    telemetry::MaskedNumber,
};

use super::callback_outcome::CallbackOutcome;

/// What the callback endpoint needs, shared by all workers.
pub struct CallbackState {
    pub keyring: Keyring,
    /// Path Sinch signed when a proxy rewrites it; else the request path is used.
    pub public_callback_path: Option<String>,
    pub max_clock_skew: Option<Duration>,
    pub body_limit: usize,
    /// How long the policy may take before `on_error` is answered instead.
    pub decision_deadline: Duration,
    /// How long a callback waits for a store that is still opening.
    pub startup_wait: Duration,
    pub clock: Clock,
    pub policy: Arc<dyn Policy>,
    pub store: StoreSlot,
    pub metrics: Arc<Metrics>,
}

pub async fn receive(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<CallbackState>,
    span: RootSpan,
) -> HttpResponse {
    let body = match read_body(&req, payload, state.body_limit).await {
        Ok(body) => body,
        Err(error) => {
            let outcome = CallbackOutcome::BadRequest {
                event_type: None,
                error,
            };
            return outcome.finish(&state.metrics, &span);
        }
    };
    let mut event = None;
    let outcome = handle(&req, &body, &state, &span, &mut event).await;
    outcome.finish(&state.metrics, &span)
}

/// Everything between the body and the answer; `parsed` keeps the event the outcome
/// borrows from.
async fn handle<'a>(
    req: &HttpRequest,
    body: &'a Bytes,
    state: &'a CallbackState,
    span: &RootSpan,
    parsed: &'a mut Option<VerificationEvent>,
) -> CallbackOutcome<'a> {
    let received_at = state.clock.now();
    let headers = req.headers();
    let signed = SignedRequest {
        method: req.method().as_str(),
        path: state.public_callback_path.as_deref().unwrap_or(req.path()),
        content_type: header_bytes(headers, header::CONTENT_TYPE.as_str()),
        timestamp: header_bytes(headers, "x-timestamp"),
        authorization: header_bytes(headers, header::AUTHORIZATION.as_str()),
        body,
    };
    let freshness = Freshness {
        now: received_at,
        max_skew: state.max_clock_skew,
    };
    let app_key = match state.keyring.verify(&signed, freshness) {
        Ok(key) => key,
        Err(err) => {
            return CallbackOutcome::Unauthenticated {
                reason: err.code().as_str(),
                error: ApiError::from(err),
            }
        }
    };
    span.record("app_key", app_key);
    let event: &'a VerificationEvent = match VerificationEvent::parse(body) {
        Ok(event) => parsed.insert(event),
        Err(err) => {
            return CallbackOutcome::BadRequest {
                event_type: None,
                error: err.into(),
            }
        }
    };
    record_span_facts(span, event);
    let incoming = IncomingEvent {
        event,
        raw: body,
        app_key,
        received_at,
        decision: None,
        book: None,
    };
    let waiting_since = state.store.get().is_none().then(std::time::Instant::now);
    let store = match state.store.ready_within(state.startup_wait).await {
        Ok(store) => store,
        Err(err) => return not_recorded(state, event, &err),
    };
    if let Some(since) = waiting_since {
        tracing::info!(
            waited_ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX),
            "callback waited for the store to open"
        );
    }
    match event {
        VerificationEvent::Request(request) => {
            answer_request(state, store, incoming, request).await
        }
        _ => acknowledge(state, store, incoming).await,
    }
}

/// The store cannot take the event: a request still gets allow/deny (`on_error`), any
/// other event a 503 so that Sinch retries it.
fn not_recorded<'a>(
    state: &CallbackState,
    event: &'a VerificationEvent,
    err: &dyn std::fmt::Display,
) -> CallbackOutcome<'a> {
    match event {
        VerificationEvent::Request(_) => CallbackOutcome::RequestNotRecorded {
            on_error: state.policy.on_error(),
            error: err.to_string(),
        },
        _ => CallbackOutcome::NotRecorded {
            event_type: event.event_type(),
            error: err.to_string(),
        },
    }
}

/// Decides and records a request event; always answers allow or deny.
async fn answer_request<'a>(
    state: &CallbackState,
    store: &Store,
    incoming: IncomingEvent<'a>,
    request: &VerificationRequestEvent,
) -> CallbackOutcome<'a> {
    let event = incoming.event;
    let duplicate = |answer: Option<serde_json::Value>| CallbackOutcome::Duplicate {
        event_type: event.event_type(),
        answer: Some(answer.unwrap_or_else(|| on_error_answer(state.policy.as_ref()))),
    };
    // A delivery of the same event already in flight is waited for here, so the policy
    // decides (and counts) each event once. The number's history, when the policy reads
    // it, comes with the admission.
    let now = state.clock.now();
    let admitting = Instant::now();
    let (admitted, history) = match history_ask(state, request, now) {
        Some(ask) => {
            let (admitted, records) = store.admit_with_history(incoming, ask).await;
            (admitted, history_of_records(records, now, ask))
        }
        None => (store.admit(incoming).await, NumberHistory::New),
    };
    let stage = |name, since: Instant| state.metrics.observe_request_stage(name, since.elapsed());
    stage(RequestStage::Admit, admitting);
    let claim = match admitted {
        Ok(Admission::First(claim)) => claim,
        Ok(Admission::Duplicate(first)) => return duplicate(first.answer),
        Err(err) => return not_recorded(state, event, &err),
    };
    let deciding = Instant::now();
    let Decided {
        decision,
        on_error,
        settling,
        booked,
    } = decide(state, request, history).await;
    stage(RequestStage::Decide, deciding);
    let answer = CallbackResponse {
        action: decision.action,
        fields: decision.response.clone(),
    };
    let answer = serde_json::to_value(&answer).unwrap_or_default();
    let record = DecisionRecord::new(
        &decision,
        on_error,
        &state.policy.version(),
        state.clock.now(),
        answer.clone(),
    );
    let recording = Instant::now();
    let recorded = store.record(
        claim,
        IncomingEvent {
            decision: Some(&record),
            book: booked.as_ref(),
            ..incoming
        },
    );
    // What the policy still writes for its decision goes with the record: the answer
    // leaves once both are done.
    let (stored, settled) = match settling {
        Some(settling) => futures_util::future::join(recorded, settling).await,
        None => (recorded.await, Ok(())),
    };
    stage(RequestStage::Record, recording);
    if let Err(err) = settled {
        // The decision stands (it is recorded as answered); what the policy failed to
        // write after it only costs its counts the undo of a few planned steps or the
        // outcome of this verification.
        static SETTLE_FAILURES: crate::telemetry::OncePer =
            crate::telemetry::OncePer::new(std::time::Duration::from_secs(10));
        if let Some(held_back) = SETTLE_FAILURES.due() {
            tracing::warn!(error.message = %err, held_back, "the policy could not settle a decision");
        }
    }
    match stored {
        Ok(RecordOutcome::Stored { .. }) => {
            let rule = match (&decision.rule, on_error) {
                (Some(rule), _) => rule.clone(),
                (None, true) => "on_error".to_owned(),
                (None, false) => "default".to_owned(),
            };
            CallbackOutcome::Answered {
                decision,
                rule,
                answer,
            }
        }
        // A concurrent delivery of the same event won the race: give its answer.
        Ok(RecordOutcome::Duplicate(first)) => duplicate(first.answer.or(Some(answer))),
        Err(err) => not_recorded(state, event, &err),
    }
}

/// What a policy that spares returning numbers asks of the request's number: its
/// verifications of the policy's window, at most as many as make a returning user (more,
/// and it is none). `None` for a policy that does not read it.
fn history_ask<'a>(
    state: &CallbackState,
    request: &'a VerificationRequestEvent,
    now: DateTime<Utc>,
) -> Option<HistoryAsk<'a>> {
    let within = state
        .policy
        .number_history_window()
        .and_then(|w| chrono::Duration::from_std(w).ok())?;
    Some(HistoryAsk {
        number: &request.identity.endpoint,
        since: now - within,
        // Up to and including this moment.
        until: now + chrono::Duration::milliseconds(1),
        limit: crate::policy::MOST_VERIFICATIONS,
    })
}

/// The number's history from what the store found for `ask`. A lookup that fails counts
/// the number as new: sparing is a kindness the decision can do without.
fn history_of_records(
    records: Result<Vec<VerificationRecord>, StoreError>,
    now: DateTime<Utc>,
    ask: HistoryAsk<'_>,
) -> NumberHistory {
    match records {
        Ok(records) => history_of(records.iter(), now, now - ask.since),
        Err(err) => {
            static LOOKUP_FAILURES: crate::telemetry::OncePer =
                crate::telemetry::OncePer::new(std::time::Duration::from_secs(10));
            if let Some(held_back) = LOOKUP_FAILURES.due() {
                tracing::warn!(error.message = %err, held_back, "the number's history could not be read; deciding as for a new number");
            }
            NumberHistory::New
        }
    }
}

fn on_error_answer(policy: &dyn Policy) -> serde_json::Value {
    serde_json::json!(CallbackResponse::bare(policy.on_error()))
}

/// The policy's decision and what goes with it to the store.
struct Decided<'a> {
    decision: PolicyDecision,
    /// Whether the decision is the policy's `on_error` answer.
    on_error: bool,
    /// What the policy still writes for the decision, awaited with the event's record.
    settling: Option<Settling<'a>>,
    /// What the shared outcome book gains, written with the event's record.
    booked: Option<OutcomeBookChange>,
}

impl Decided<'_> {
    fn alone(decision: PolicyDecision, on_error: bool) -> Self {
        Self {
            decision,
            on_error,
            settling: None,
            booked: None,
        }
    }
}

/// The policy's decision, or its `on_error` answer when it fails, panics or misses the
/// decision deadline, and what the policy still writes for it. A policy that waits on a
/// database is awaited here; a bounded policy decides right here, on the HTTP worker; any
/// other runs on the blocking pool, so that a slow one (say, one that calls a scoring
/// service) cannot hold up this worker past the deadline.
async fn decide<'a>(
    state: &'a CallbackState,
    request: &'a VerificationRequestEvent,
    history: NumberHistory,
) -> Decided<'a> {
    let started = Instant::now();
    let now = state.clock.now();
    let deadline = state.decision_deadline;
    let failure = if let Some(decision) = state.policy.decide_waiting(request, history, now) {
        let decided = tokio::time::timeout(deadline, AssertUnwindSafe(decision).catch_unwind());
        match decided.await {
            Ok(Ok(Ok(waiting))) => {
                return Decided {
                    decision: waiting.decision,
                    on_error: false,
                    settling: waiting.settling,
                    booked: waiting.booked,
                }
            }
            Ok(Ok(Err(err))) => err.to_string(),
            Ok(Err(_)) => "the policy failed: it panicked".to_owned(),
            Err(_) => {
                state.metrics.deadline_exceeded();
                missed_deadline(deadline)
            }
        }
    } else if state.policy.bounded() {
        let decided = std::panic::catch_unwind(AssertUnwindSafe(|| {
            state.policy.decide(request, history, now)
        }));
        match decided {
            Ok(Ok(decision)) if started.elapsed() <= deadline => {
                return Decided::alone(decision, false)
            }
            Ok(Ok(late)) => {
                state.metrics.deadline_exceeded();
                tracing::warn!(
                    late_decision = late.action.as_str(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "a bounded policy took longer than the decision deadline"
                );
                missed_deadline(deadline)
            }
            Ok(Err(err)) => err.to_string(),
            Err(_) => "the policy failed: it panicked".to_owned(),
        }
    } else {
        match decide_on_pool(state, request, history, now, started).await {
            Ok(decision) => return Decided::alone(decision, false),
            Err(failure) => failure,
        }
    };
    // Once per interval: a database outage fails every request the same way.
    static POLICY_FAILURES: crate::telemetry::OncePer =
        crate::telemetry::OncePer::new(std::time::Duration::from_secs(10));
    if let Some(held_back) = POLICY_FAILURES.due() {
        tracing::warn!(error.message = %failure, held_back, "answering on_error");
    }
    let decision = PolicyDecision {
        action: state.policy.on_error(),
        rule: None,
        reason: format!("on_error: {failure}"),
        response: Default::default(),
        explanation: Default::default(),
        spared: Vec::new(),
    };
    Decided::alone(decision, true)
}

/// What a policy still writes for a decision, awaited with the event's record.
type Settling<'a> =
    futures_util::future::LocalBoxFuture<'a, Result<(), crate::policy::PolicyError>>;

fn missed_deadline(deadline: Duration) -> String {
    format!(
        "the policy did not decide within the {} ms deadline",
        deadline.as_millis()
    )
}

/// Runs a policy that may be slow on the blocking pool, under the deadline.
async fn decide_on_pool(
    state: &CallbackState,
    request: &VerificationRequestEvent,
    history: NumberHistory,
    now: chrono::DateTime<Utc>,
    started: Instant,
) -> Result<PolicyDecision, String> {
    let policy = Arc::clone(&state.policy);
    let owned = request.clone();
    let mut decision = tokio::task::spawn_blocking(move || policy.decide(&owned, history, now));
    match tokio::time::timeout(state.decision_deadline, &mut decision).await {
        Ok(Ok(Ok(decision))) => Ok(decision),
        Ok(Ok(Err(err))) => Err(err.to_string()),
        Ok(Err(join)) => Err(format!("the policy failed: {join}")),
        Err(_) => {
            state.metrics.deadline_exceeded();
            tokio::spawn(async move {
                if let Ok(Ok(late)) = decision.await {
                    tracing::warn!(
                        late_decision = late.action.as_str(),
                        late_rule = late.rule.as_deref().unwrap_or("default"),
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "late policy decision, after on_error was answered"
                    );
                }
            });
            Err(missed_deadline(state.decision_deadline))
        }
    }
}

/// Records a result, SMS-delivered or unknown event; an empty 200 once it is durable.
async fn acknowledge<'a>(
    state: &CallbackState,
    store: &Store,
    incoming: IncomingEvent<'a>,
) -> CallbackOutcome<'a> {
    let event = incoming.event;
    let take = OutcomeBookChange::Take;
    let takes = takes_from_book(state.policy.as_ref(), event);
    let incoming = IncomingEvent {
        book: takes.then_some(&take),
        ..incoming
    };
    match store.record_once(incoming).await {
        Ok(RecordOutcome::Stored {
            decision, taken, ..
        }) => {
            if let VerificationEvent::Result(result) = event {
                let taken = takes.then_some(taken);
                let at = incoming.received_at;
                report_outcome(state, store, result, decision, taken, at).await;
            }
            CallbackOutcome::Recorded {
                event_type: event.event_type(),
                unknown: matches!(event, VerificationEvent::Unknown { .. }),
            }
        }
        Ok(RecordOutcome::Duplicate(_)) => CallbackOutcome::Duplicate {
            event_type: event.event_type(),
            answer: None,
        },
        Err(err) => not_recorded(state, event, &err),
    }
}

/// Whether `event` is a final result whose verification leaves the policy's shared
/// outcome book with the result's record (the store takes it out in the same write).
fn takes_from_book(policy: &dyn Policy, event: &VerificationEvent) -> bool {
    let VerificationEvent::Result(result) = event else {
        return false;
    };
    policy
        .learning()
        .is_some_and(|l| l.takes_from_book(&result.status, result.reason.as_deref()))
}

/// Tells the policy how a verification it decided on ended (final statuses only).
/// `decided` is its decision if the store handed it back with the write; else the
/// record is read for it. `taken`: what the store took out of the outcome book, when
/// it was asked to take (`RecordOutcome::Stored::taken`).
async fn report_outcome(
    state: &CallbackState,
    store: &Store,
    result: &VerificationResultEvent,
    decided: Option<Box<DecisionRecord>>,
    taken: Option<Option<String>>,
    at: DateTime<Utc>,
) {
    if state.policy.learning().is_none() || result.status == "PENDING" {
        return;
    }
    let decision = match decided {
        Some(decision) => *decision,
        None => match store.verification(&result.id).await {
            Ok(Some(VerificationRecord {
                decision: Some(decision),
                ..
            })) => decision,
            _ => return,
        },
    };
    if let Some(learning) = state.policy.learning() {
        let outcome = outcome_of(result, &decision, book_taking(&taken), at);
        if let Some(learned) = learning.observe_outcome_waiting(outcome) {
            learned.await;
            return;
        }
    }
    let result = result.clone();
    off_async_workers(&state.policy, move |policy| {
        if let Some(learning) = policy.learning() {
            learning.observe_outcome(outcome_of(&result, &decision, book_taking(&taken), at));
        }
    })
    .await;
}

/// What the store took out of the outcome book, as the policy is told it.
fn book_taking(taken: &Option<Option<String>>) -> BookTaking<'_> {
    taken
        .as_ref()
        .map_or(BookTaking::NotAsked, |t| BookTaking::Taken(t.as_deref()))
}

/// What the policy learns of a verification that ended.
fn outcome_of<'a>(
    result: &'a VerificationResultEvent,
    decision: &'a DecisionRecord,
    book: BookTaking<'a>,
    at: DateTime<Utc>,
) -> Outcome<'a> {
    Outcome {
        id: &result.id,
        rule: decision.rule.as_deref(),
        shadow: &decision.explanation.shadow,
        status: &result.status,
        reason: result.reason.as_deref(),
        at,
        book,
    }
}

fn record_span_facts(span: &RootSpan, event: &VerificationEvent) {
    span.record("verification_id", event.id());
    span.record("event", event.event_type());
    if let Some(method) = event.method() {
        span.record("method", method.as_str());
    }
    if let Some(number) = event.number() {
        span.record("number", tracing::field::display(MaskedNumber(number)));
    }
}

fn header_bytes<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers.get(name).map(|v| v.as_bytes())
}

/// Reads the body up to `limit` bytes; the signature is computed over these exact bytes.
async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("the body exceeds {limit} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(too_large());
    }
    let mut body = BytesMut::with_capacity(declared.unwrap_or(1024).min(limit));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::new(
                ErrorCode::BadRequest,
                format!("reading the body failed: {e}"),
            )
        })?;
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}
