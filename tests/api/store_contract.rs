//! The store contract, written once: what every storage backend must do, checked through
//! the `Store` interface the rest of verigate uses. `contract_tests!` runs every check
//! against one backend; each backend (the embedded sled store today) gets one line at the
//! bottom. A backend that cannot do something must fail its check, never skip it.

use std::{collections::HashSet, path::Path, sync::Arc, time::Duration};

use chrono::{DateTime, TimeZone, Utc};
use verigate::{
    decision::{DecisionRecord, PolicyDecision},
    events::{Action, VerificationEvent},
    store::{
        Admission, EventQuery, IncomingEvent, NumberPrivacy, RecordOutcome, StatsQuery, Store,
        StoreOptions, Unobserved, VerificationFilter, VerificationQuery,
    },
};

use crate::helpers::{request_event, result_event, sms_delivered_event};

/// How to open a store of one backend in a folder (again, to reopen it).
pub struct Backend {
    pub name: &'static str,
    pub open: fn(&Path, NumberPrivacy) -> Store,
    /// Whether what the backend needs is there (false only when skipping on request).
    pub available: fn() -> bool,
}

pub const SLED: Backend = Backend {
    name: "sled",
    open: |dir, numbers| {
        let options = StoreOptions {
            path: dir.join("db"),
            numbers,
            cache_bytes: 16 << 20,
            // Small, so that the checks cross many checkpoints (memory and index).
            checkpoint_events: 16,
            postgres: None,
        };
        Store::open(&options, Arc::new(Unobserved)).expect("the sled store opens")
    },
    available: || true,
};

/// A database of its own per folder, on the test PostgreSQL server.
pub const POSTGRES: Backend = Backend {
    name: "postgres",
    open: |dir, numbers| {
        let url = crate::postgres::database(&dir.display().to_string());
        let options = StoreOptions {
            numbers,
            postgres: Some(verigate::store::postgres::PostgresOptions {
                url: url.into(),
                pool_size: 8,
            }),
            ..StoreOptions::at(dir.join("unused"))
        };
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current()
                .block_on(Store::connect(&options, Arc::new(Unobserved)))
        })
        .expect("the PostgreSQL store opens")
    },
    available: crate::postgres::available,
};

fn backend_named(name: &str) -> &'static Backend {
    match name {
        "sled" => &SLED,
        "postgres" => &POSTGRES,
        other => panic!("no backend `{other}`"),
    }
}

fn at(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000 + secs, 0).unwrap()
}

fn decision(action: Action, rule: Option<&str>) -> DecisionRecord {
    DecisionRecord::new(
        &PolicyDecision {
            action,
            rule: rule.map(str::to_owned),
            reason: format!("because of {rule:?}"),
            response: Default::default(),
            explanation: Default::default(),
            spared: Vec::new(),
        },
        false,
        "v1",
        at(0),
        serde_json::json!({ "action": action.as_str() }),
    )
}

/// Records a callback body received at `secs`, with a decision for request events.
async fn put(
    store: &Store,
    body: &str,
    secs: i64,
    decided: Option<&DecisionRecord>,
) -> RecordOutcome {
    let event = VerificationEvent::parse(body.as_bytes()).unwrap();
    store
        .record_once(IncomingEvent {
            event: &event,
            raw: body.as_bytes(),
            app_key: "app",
            received_at: at(secs),
            decision: decided,
            book: None,
        })
        .await
        .unwrap()
}

fn everything(limit: usize) -> VerificationQuery {
    VerificationQuery::between(DateTime::<Utc>::UNIX_EPOCH, DateTime::<Utc>::MAX_UTC, limit)
}

fn by(filter: VerificationFilter) -> VerificationQuery {
    VerificationQuery {
        filter,
        ..everything(100)
    }
}

async fn ids(store: &Store, query: VerificationQuery) -> Vec<String> {
    let page = store.verifications(query).await.unwrap();
    page.items.into_iter().map(|r| r.id).collect()
}

/// Every record, page by page.
async fn all_ids(store: &Store, page_size: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .verifications(everything(page_size).after(after))
            .await
            .unwrap();
        out.extend(page.items.into_iter().map(|r| r.id));
        match page.next {
            Some(next) => after = Some(next),
            None => return out,
        }
    }
}

pub async fn duplicates_get_the_first_answer_and_change_nothing(backend: &Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = (backend.open)(dir.path(), NumberPrivacy::Plain);
    let body = request_event("dup", "sms", "+46700000001");
    let allow = decision(Action::Allow, None);
    let deny = decision(Action::Deny, Some("other"));
    let RecordOutcome::Stored { seq, .. } = put(&store, &body, 0, Some(&allow)).await else {
        panic!("{}: the first delivery must be stored", backend.name)
    };
    match put(&store, &body, 5, Some(&deny)).await {
        RecordOutcome::Duplicate(first) => {
            assert_eq!(first.seq, seq, "{}", backend.name);
            assert_eq!(first.answer, Some(allow.answer.clone()), "{}", backend.name);
        }
        other => panic!("{}: a duplicate was stored again: {other:?}", backend.name),
    }
    // Results are told apart by status: PENDING then SUCCESSFUL are two events. A store
    // that hands back the verification's decision with a result hands back its own.
    match put(&store, &result_event("dup", "PENDING"), 6, None).await {
        RecordOutcome::Stored { decision, .. } => {
            if let Some(handed) = decision {
                assert_eq!(*handed, allow, "{}", backend.name);
            }
        }
        other => panic!("{}: a new result was not stored: {other:?}", backend.name),
    }
    put(&store, &result_event("dup", "SUCCESSFUL"), 7, None).await;
    assert!(matches!(
        put(&store, &result_event("dup", "SUCCESSFUL"), 8, None).await,
        RecordOutcome::Duplicate(_)
    ));
    let record = store.verification("dup").await.unwrap().unwrap();
    assert_eq!(record.event_count, 3, "{}", backend.name);
    assert_eq!(record.decision.unwrap().action, Action::Allow);
    assert_eq!(record.result.unwrap().status, "SUCCESSFUL");
    let events = store
        .events(EventQuery {
            since: DateTime::<Utc>::UNIX_EPOCH,
            until: DateTime::<Utc>::MAX_UTC,
            after: None,
            limit: 100,
        })
        .await
        .unwrap();
    assert_eq!(events.items.len(), 3, "{}", backend.name);
    assert_eq!(
        events.items[0].body.get(),
        body,
        "{}: bodies are kept as received",
        backend.name
    );
    store.shutdown().await.unwrap();
}

pub async fn concurrent_deliveries_of_one_event_are_admitted_once(backend: &Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = (backend.open)(dir.path(), NumberPrivacy::Plain);
    let body = request_event("race", "sms", "+46700000002");
    let event = VerificationEvent::parse(body.as_bytes()).unwrap();
    let allow = decision(Action::Allow, None);
    let deliveries = (0..16).map(|_| async {
        let incoming = IncomingEvent {
            event: &event,
            raw: body.as_bytes(),
            app_key: "app",
            received_at: at(0),
            decision: None,
            book: None,
        };
        match store.admit(incoming).await.unwrap() {
            Admission::First(claim) => {
                // Deciding takes a moment: every other delivery arrives meanwhile.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let decided = IncomingEvent {
                    decision: Some(&allow),
                    ..incoming
                };
                match store.record(claim, decided).await.unwrap() {
                    RecordOutcome::Stored { seq, .. } => (true, seq),
                    RecordOutcome::Duplicate(first) => (false, first.seq),
                }
            }
            Admission::Duplicate(first) => {
                assert_eq!(first.answer, Some(allow.answer.clone()));
                (false, first.seq)
            }
        }
    });
    let outcomes = futures_util::future::join_all(deliveries).await;
    let firsts = outcomes.iter().filter(|(first, _)| *first).count();
    assert_eq!(firsts, 1, "{}: {outcomes:?}", backend.name);
    assert_eq!(
        outcomes
            .iter()
            .map(|(_, seq)| seq)
            .collect::<HashSet<_>>()
            .len(),
        1,
        "{}: every delivery gets the first one's answer",
        backend.name
    );
    store.shutdown().await.unwrap();
}

/// An event a backend cannot take (here a NUL character, which the HTTP layer refuses)
/// fails on its own: the events written alongside it, in the same commit on a backend
/// that groups them, are stored, and the store stays ready.
pub async fn an_event_the_store_refuses_fails_alone(backend: &Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = (backend.open)(dir.path(), NumberPrivacy::Plain);
    let bodies: Vec<String> = (0..64)
        .map(|i| result_event(&format!("alone-{i}"), "SUCCESSFUL"))
        .collect();
    let mut events: Vec<VerificationEvent> = bodies
        .iter()
        .map(|b| VerificationEvent::parse(b.as_bytes()).unwrap())
        .collect();
    let odd = 32;
    if let VerificationEvent::Result(result) = &mut events[odd] {
        // The HTTP layer refuses this; a store may refuse it too (PostgreSQL text
        // cannot hold a NUL character).
        result.reference = Some("nul\0inside".into());
    }
    let writes = events.iter().zip(&bodies).map(|(event, body)| {
        store.record_once(IncomingEvent {
            event,
            raw: body.as_bytes(),
            app_key: "app",
            received_at: at(0),
            decision: None,
            book: None,
        })
    });
    let outcomes = futures_util::future::join_all(writes).await;
    for (i, outcome) in outcomes.iter().enumerate() {
        if i != odd {
            assert!(
                matches!(outcome, Ok(RecordOutcome::Stored { .. })),
                "{}: event {i}: {outcome:?}",
                backend.name
            );
        }
    }
    let stored = all_ids(&store, 100).await;
    let expected = 63 + usize::from(outcomes[odd].is_ok());
    assert_eq!(stored.len(), expected, "{}: {stored:?}", backend.name);
    assert_eq!(
        store.health(),
        verigate::store::StoreHealth::Ready,
        "{}",
        backend.name
    );
    store.shutdown().await.unwrap();
}

/// A reference is the customer's own and can be long: stored, and found by it whole.
pub async fn a_long_reference_is_stored_and_found_by_it(backend: &Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = (backend.open)(dir.path(), NumberPrivacy::Plain);
    // Two that share their first thousands of characters and differ at the end.
    let long = |tail: &str| format!("{}{tail}", "Ref-".repeat(1000));
    for (id, reference) in [("long-a", long("a")), ("long-b", long("b"))] {
        let mut event: serde_json::Value =
            serde_json::from_str(&result_event(id, "SUCCESSFUL")).unwrap();
        event["reference"] = serde_json::Value::String(reference);
        put(&store, &event.to_string(), 0, None).await;
    }
    let found = ids(
        &store,
        by(VerificationFilter {
            reference: Some(long("b")),
            ..Default::default()
        }),
    )
    .await;
    assert_eq!(found, ["long-b"], "{}", backend.name);
    store.shutdown().await.unwrap();
}

pub async fn events_join_into_one_record_whatever_their_order(backend: &Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = (backend.open)(dir.path(), NumberPrivacy::Plain);
    let allow = decision(Action::Allow, None);
    // The result first, then the SMS receipt, then the request.
    put(&store, &result_event("late", "SUCCESSFUL"), 0, None).await;
    put(&store, &sms_delivered_event("late"), 1, None).await;
    put(
        &store,
        &request_event("late", "sms", "+46700000003"),
        2,
        Some(&allow),
    )
    .await;
    let record = store.verification("late").await.unwrap().unwrap();
    assert_eq!(record.event_count, 3);
    assert_eq!(record.result.unwrap().status, "SUCCESSFUL");
    assert_eq!(record.sms_delivery.unwrap().result, "Successful");
    assert!(record.request.is_some() && record.decision.is_some());
    // The number arrived with a later event, and is still found by it.
    let found = ids(
        &store,
        by(VerificationFilter {
            number: Some("+46700000001".into()),
            ..Default::default()
        }),
    )
    .await;
    assert_eq!(found, ["late"], "{}", backend.name);
    store.shutdown().await.unwrap();
}

/// Callbacks that arrive together (sharing a commit on a backend that groups them): for
/// many verifications at once, the request, the result and a repeat of the request. Each
/// record joins both events once, placed where its first event is, and is found by the
/// number and the reference it got from them.
pub async fn events_arriving_together_join_into_one_record(backend: &Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = (backend.open)(dir.path(), NumberPrivacy::Plain);
    let allow = decision(Action::Allow, Some("together"));
    let verifications: Vec<(String, String, String, String)> = (0..40)
        .map(|i| {
            let id = format!("together-{i:02}");
            let number = format!("+467000001{i:02}");
            let status = if i % 2 == 0 { "SUCCESSFUL" } else { "FAIL" };
            let request = request_event(&id, "sms", &number);
            let result = result_event(&id, status).replace("+46700000001", &number);
            (id.clone(), number, request, result)
        })
        .collect();
    let deliveries = verifications.iter().enumerate().flat_map(|(i, v)| {
        let secs = i64::try_from(i).unwrap();
        [
            put(&store, &v.2, secs, Some(&allow)),
            put(&store, &v.3, secs, None),
            put(&store, &v.2, secs, Some(&allow)),
        ]
    });
    let outcomes = futures_util::future::join_all(deliveries).await;
    for (i, (id, number, _, _)) in verifications.iter().enumerate() {
        let stored: Vec<u64> = outcomes[i * 3..i * 3 + 3]
            .iter()
            .filter_map(|o| match o {
                RecordOutcome::Stored { seq, .. } => Some(*seq),
                RecordOutcome::Duplicate(_) => None,
            })
            .collect();
        assert_eq!(stored.len(), 2, "{}: {id}: {outcomes:?}", backend.name);
        let record = store.verification(id).await.unwrap().unwrap();
        assert_eq!(record.event_count, 2, "{}: {record:?}", backend.name);
        assert_eq!(record.seq, stored[0].min(stored[1]), "{}", backend.name);
        assert_eq!(record.number.as_deref(), Some(number.as_str()));
        assert_eq!(record.reference, Some(format!("ref-{id}")));
        assert_eq!(
            record.decision.map(|d| d.answer),
            Some(allow.answer.clone())
        );
        let status = record.result.map(|r| r.status);
        let expected = if i % 2 == 0 { "SUCCESSFUL" } else { "FAIL" };
        assert_eq!(status.as_deref(), Some(expected), "{}", backend.name);
        let by_number = VerificationFilter {
            number: Some(number.clone()),
            ..Default::default()
        };
        assert_eq!(ids(&store, by(by_number)).await, [id.as_str()]);
        let by_reference = VerificationFilter {
            reference: Some(format!("ref-{id}")),
            ..Default::default()
        };
        assert_eq!(ids(&store, by(by_reference)).await, [id.as_str()]);
    }
    store.shutdown().await.unwrap();
}

/// A number's recent verifications, for a policy reading its history: the newest first,
/// only that number's, only those first seen in the window.
pub async fn a_numbers_recent_verifications_are_the_newest_of_the_window(backend: &Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = (backend.open)(dir.path(), NumberPrivacy::Plain);
    let allow = decision(Action::Allow, None);
    // Enough to cross several checkpoints of an engine that moves memory into an index.
    for i in 0..40 {
        let body = request_event(&format!("recent-{i}"), "sms", "+46700000042");
        put(&store, &body, i, Some(&allow)).await;
    }
    put(
        &store,
        &request_event("other", "sms", "+46700000043"),
        40,
        Some(&allow),
    )
    .await;
    let ids = |records: Vec<verigate::store::VerificationRecord>| -> Vec<String> {
        records.into_iter().map(|r| r.id).collect()
    };
    let ask = |number: &'static str, from: i64, to: i64, limit: usize| {
        let store = &store;
        async move {
            ids(store
                .recent_of_number(number, at(from), at(to), limit)
                .await
                .unwrap())
        }
    };
    let name = backend.name;
    assert_eq!(
        ask("+46700000042", 1, 10, 3).await,
        ["recent-9", "recent-8", "recent-7"],
        "{name}"
    );
    assert_eq!(
        ask("+46700000042", 30, 100, 3).await,
        ["recent-39", "recent-38", "recent-37"],
        "{name}"
    );
    assert_eq!(
        ask("+46700000042", 0, 2, 10).await,
        ["recent-1", "recent-0"],
        "{name}"
    );
    assert_eq!(ask("+46700000042", 0, 100, 64).await.len(), 40, "{name}");
    assert!(ask("+46700000044", 0, 100, 10).await.is_empty(), "{name}");
    // Asked together (one statement on a backend that groups them), each gets its own.
    let asks = ["+46700000042", "+46700000043", "+46700000044"].repeat(8);
    let answers = futures_util::future::join_all(
        asks.iter()
            .map(|n| store.recent_of_number(n, at(37), at(100), 10)),
    )
    .await;
    for (number, answer) in asks.iter().zip(answers) {
        let expected: &[&str] = match *number {
            "+46700000042" => &["recent-39", "recent-38", "recent-37"],
            "+46700000043" => &["other"],
            _ => &[],
        };
        assert_eq!(ids(answer.unwrap()), expected, "{name}: {number}");
    }
    store.shutdown().await.unwrap();
}

pub async fn a_verifications_own_events_are_found_among_others(backend: &Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = (backend.open)(dir.path(), NumberPrivacy::Plain);
    let allow = decision(Action::Allow, None);
    let mine = [
        request_event("mine", "sms", "+46700000004"),
        sms_delivered_event("mine"),
        result_event("mine", "SUCCESSFUL"),
    ];
    put(&store, &mine[0], 0, Some(&allow)).await;
    put(
        &store,
        &request_event("other", "sms", "+46700000005"),
        1,
        Some(&allow),
    )
    .await;
    put(&store, &mine[1], 2, None).await;
    put(&store, &result_event("other", "FAIL"), 3, None).await;
    put(&store, &mine[2], 4, None).await;
    // A second delivery of a result is not another event.
    put(&store, &mine[2], 5, None).await;
    put(
        &store,
        &request_event("after", "sms", "+46700000006"),
        6,
        Some(&allow),
    )
    .await;

    let record = store.verification("mine").await.unwrap().unwrap();
    let (events, complete) = store.events_of(&record, 100).await.unwrap();
    assert!(complete, "{}", backend.name);
    let kinds: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "VerificationRequestEvent",
            "VerificationSmsDeliveredEvent",
            "VerificationResultEvent"
        ],
        "{}",
        backend.name
    );
    for (event, body) in events.iter().zip(&mine) {
        assert_eq!(event.id, "mine");
        let stored: serde_json::Value = serde_json::from_str(event.body.get()).unwrap();
        let sent: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(stored, sent, "{}", backend.name);
    }
    let other = store.verification("other").await.unwrap().unwrap();
    let (events, complete) = store.events_of(&other, 100).await.unwrap();
    assert_eq!((events.len(), complete), (2, true), "{}", backend.name);
    store.shutdown().await.unwrap();
}

pub async fn listings_follow_creation_order_and_filters(backend: &Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = (backend.open)(dir.path(), NumberPrivacy::Plain);
    let (allow, deny) = (
        decision(Action::Allow, None),
        decision(Action::Deny, Some("block")),
    );
    for i in 0..30 {
        let number = format!("+4670000{:04}", i % 7);
        let decided = if i % 3 == 0 { &deny } else { &allow };
        put(
            &store,
            &request_event(&format!("v{i:02}"), "sms", &number),
            i,
            Some(decided),
        )
        .await;
        if i % 2 == 0 {
            put(&store, &result_event(&format!("v{i:02}"), "FAIL"), i, None).await;
        }
    }
    let expected: Vec<String> = (0..30).map(|i| format!("v{i:02}")).collect();
    assert_eq!(
        all_ids(&store, 4).await,
        expected,
        "{}: creation order",
        backend.name
    );
    let by_number = ids(
        &store,
        by(VerificationFilter {
            number: Some("+46700000003".into()),
            ..Default::default()
        }),
    )
    .await;
    assert_eq!(by_number, ["v03", "v10", "v17", "v24"], "{}", backend.name);
    let by_reference = ids(
        &store,
        by(VerificationFilter {
            reference: Some("ref-v07".into()),
            ..Default::default()
        }),
    )
    .await;
    assert_eq!(by_reference, ["v07"], "{}", backend.name);
    let denied_failed = ids(
        &store,
        by(VerificationFilter {
            action: Some("deny"),
            status: Some("FAIL".into()),
            ..Default::default()
        }),
    )
    .await;
    assert_eq!(
        denied_failed,
        ["v00", "v06", "v12", "v18", "v24"],
        "{}",
        backend.name
    );
    let window = VerificationQuery::between(at(10), at(13), 100);
    assert_eq!(
        ids(&store, window).await,
        ["v10", "v11", "v12"],
        "{}",
        backend.name
    );
    let stats = store
        .stats(StatsQuery {
            since: DateTime::<Utc>::UNIX_EPOCH,
            until: DateTime::<Utc>::MAX_UTC,
            group_by: vec![],
        })
        .await
        .unwrap();
    assert_eq!(
        (stats[0].verifications, stats[0].allowed, stats[0].denied),
        (30, 20, 10),
        "{}",
        backend.name
    );
    assert_eq!(stats[0].results["FAIL"], 15, "{}", backend.name);
    // A cursor past the end of the range leaves nothing, by number as in a scan.
    let first = store.verifications(everything(1)).await.unwrap();
    for number in [None, Some("+46700000000".to_owned())] {
        let past = VerificationQuery {
            filter: VerificationFilter {
                number,
                ..Default::default()
            },
            ..VerificationQuery::between(at(0), at(0), 100)
        }
        .after(first.next.clone());
        let page = store.verifications(past).await.unwrap();
        assert!(
            page.items.is_empty() && page.next.is_none(),
            "{}",
            backend.name
        );
    }
    store.shutdown().await.unwrap();
}

pub async fn pagination_has_no_gaps_under_concurrent_writes(backend: &Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = (backend.open)(dir.path(), NumberPrivacy::Plain);
    let allow = decision(Action::Allow, None);
    for i in 0..200 {
        put(
            &store,
            &request_event(&format!("old-{i:04}"), "sms", "+46700000004"),
            i,
            Some(&allow),
        )
        .await;
    }
    let writer = {
        let store = store.clone();
        let allow = allow.clone();
        tokio::spawn(async move {
            for i in 0..600 {
                put(
                    &store,
                    &request_event(&format!("new-{i:04}"), "sms", "+46700000005"),
                    300 + i,
                    Some(&allow),
                )
                .await;
            }
        })
    };
    // Page through while the writer adds records.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .verifications(everything(7).after(after))
            .await
            .unwrap();
        seen.extend(page.items.into_iter().map(|r| r.id));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    writer.await.unwrap();
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(
        unique.len(),
        seen.len(),
        "{}: a record was listed twice",
        backend.name
    );
    let old = seen.iter().filter(|id| id.starts_with("old-")).count();
    assert_eq!(
        old, 200,
        "{}: a record written before paging was skipped",
        backend.name
    );
    // No gaps among arrivals either: those seen are the first ones written, in order.
    let new: Vec<&String> = seen.iter().filter(|id| id.starts_with("new-")).collect();
    let expected: Vec<String> = (0..new.len()).map(|i| format!("new-{i:04}")).collect();
    assert_eq!(
        new.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        expected,
        "{}: a page skipped a record written meanwhile",
        backend.name
    );
    assert_eq!(all_ids(&store, 50).await.len(), 800);
    store.shutdown().await.unwrap();
}

pub async fn retention_deletes_a_verification_with_everything_derived_from_it(backend: &Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = (backend.open)(dir.path(), NumberPrivacy::Plain);
    let allow = decision(Action::Allow, None);
    for (id, secs) in [("old-1", 0), ("old-2", 10), ("young", 5_000)] {
        put(
            &store,
            &request_event(id, "sms", "+46700000006"),
            secs,
            Some(&allow),
        )
        .await;
        put(&store, &result_event(id, "SUCCESSFUL"), secs + 1, None).await;
    }
    let deleted = store.delete_before(at(1_000)).await.unwrap();
    assert_eq!(deleted.verifications, 2, "{}", backend.name);
    assert_eq!(deleted.events, 4, "{}", backend.name);
    assert!(store.verification("old-1").await.unwrap().is_none());
    assert_eq!(all_ids(&store, 10).await, ["young"], "{}", backend.name);
    let by_number = ids(
        &store,
        by(VerificationFilter {
            number: Some("+46700000006".into()),
            ..Default::default()
        }),
    )
    .await;
    assert_eq!(by_number, ["young"], "{}", backend.name);
    let by_reference = ids(
        &store,
        by(VerificationFilter {
            reference: Some("ref-old-2".into()),
            ..Default::default()
        }),
    )
    .await;
    assert!(by_reference.is_empty(), "{}", backend.name);
    let events = store
        .events(EventQuery {
            since: DateTime::<Utc>::UNIX_EPOCH,
            until: DateTime::<Utc>::MAX_UTC,
            after: None,
            limit: 100,
        })
        .await
        .unwrap();
    assert!(
        events.items.iter().all(|e| e.id == "young"),
        "{}",
        backend.name
    );
    // Forgotten means forgotten: the same id again is a new verification.
    assert!(matches!(
        put(
            &store,
            &request_event("old-1", "sms", "+46700000006"),
            6_000,
            Some(&allow)
        )
        .await,
        RecordOutcome::Stored { .. }
    ));
    store.shutdown().await.unwrap();
    // And it stays deleted after a restart.
    let store = (backend.open)(dir.path(), NumberPrivacy::Plain);
    assert_eq!(
        all_ids(&store, 10).await,
        ["young", "old-1"],
        "{}",
        backend.name
    );
    store.shutdown().await.unwrap();
}

pub async fn hashed_numbers_are_found_but_never_kept(backend: &Backend) {
    let dir = tempfile::tempdir().unwrap();
    let numbers = NumberPrivacy::hashed(b"a key of at least sixteen bytes");
    let store = (backend.open)(dir.path(), numbers.clone());
    let allow = decision(Action::Allow, None);
    put(
        &store,
        &request_event("h", "sms", "+46700000007"),
        0,
        Some(&allow),
    )
    .await;
    let record = store.verification("h").await.unwrap().unwrap();
    let kept = record.number.clone().unwrap();
    assert!(kept.starts_with("hmac-sha256:"), "{}: {kept}", backend.name);
    assert_eq!(kept, numbers.protect("+46700000007"));
    assert_eq!(record.country.as_deref(), Some("SE"));
    let found = ids(
        &store,
        by(VerificationFilter {
            number: Some("+46700000007".into()),
            ..Default::default()
        }),
    )
    .await;
    assert_eq!(found, ["h"], "{}", backend.name);
    let events = store
        .events(EventQuery {
            since: DateTime::<Utc>::UNIX_EPOCH,
            until: DateTime::<Utc>::MAX_UTC,
            after: None,
            limit: 10,
        })
        .await
        .unwrap();
    assert!(
        !events.items[0].body.get().contains("+46700000007"),
        "{}",
        backend.name
    );
    store.shutdown().await.unwrap();
}

pub async fn everything_survives_a_restart(backend: &Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = (backend.open)(dir.path(), NumberPrivacy::Plain);
    let allow = decision(Action::Allow, Some("r"));
    for i in 0..50 {
        put(
            &store,
            &request_event(&format!("r{i}"), "sms", "+46700000008"),
            i,
            Some(&allow),
        )
        .await;
    }
    store
        .save_state("policy_state", b"{\"blocks\":[]}".to_vec())
        .await
        .unwrap();
    store.shutdown().await.unwrap();
    drop(store);
    let store = (backend.open)(dir.path(), NumberPrivacy::Plain);
    assert_eq!(all_ids(&store, 9).await.len(), 50, "{}", backend.name);
    assert_eq!(
        store.load_state("policy_state").await.unwrap().as_deref(),
        Some(&b"{\"blocks\":[]}"[..])
    );
    // Duplicate detection survives too, and new writes follow the old ones.
    assert!(matches!(
        put(
            &store,
            &request_event("r7", "sms", "+46700000008"),
            100,
            Some(&allow)
        )
        .await,
        RecordOutcome::Duplicate(_)
    ));
    put(
        &store,
        &request_event("after", "sms", "+46700000008"),
        100,
        Some(&allow),
    )
    .await;
    assert_eq!(
        all_ids(&store, 100).await.last().map(String::as_str),
        Some("after")
    );
    store.shutdown().await.unwrap();
}

/// Writes events from 16 concurrent tasks to the store in `$VERIGATE_CONTRACT_DIR` and
/// prints `acked <id> <event>` for every durable acknowledgement, until killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a helper: acknowledged_writes_survive_a_kill_9 runs it as a child process"]
async fn crash_child() {
    use std::io::Write;
    let dir = std::env::var("VERIGATE_CONTRACT_DIR").unwrap();
    let backend = backend_named(&std::env::var("VERIGATE_CONTRACT_BACKEND").unwrap());
    let round = std::env::var("VERIGATE_CONTRACT_ROUND").unwrap();
    let store = (backend.open)(Path::new(&dir), NumberPrivacy::Plain);
    let allow = decision(Action::Allow, None);
    let writers = (0..16).map(|task| {
        let (store, allow, round) = (store.clone(), allow.clone(), round.clone());
        tokio::spawn(async move {
            for i in 0.. {
                let id = format!("crash-{round}-{task}-{i}");
                let (body, event) = if i % 3 == 2 {
                    (
                        result_event(&format!("crash-{round}-{task}-{}", i - 1), "FAIL"),
                        "result",
                    )
                } else {
                    (request_event(&id, "sms", "+46700000009"), "request")
                };
                let decided = (event == "request").then_some(&allow);
                if let RecordOutcome::Stored { .. } = put(&store, &body, i, decided).await {
                    let named = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"]
                        .as_str()
                        .unwrap()
                        .to_owned();
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "acked {named} {event}").unwrap();
                    out.flush().unwrap();
                }
            }
        })
    });
    futures_util::future::join_all(writers).await;
}

pub async fn acknowledged_writes_survive_a_kill_9(backend: &Backend) {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut acked: Vec<(String, String)> = Vec::new();
    // Kill points spread over checkpoints: the child checkpoints every 16 events, so
    // some kills land in the middle of one.
    for (round, kill_after) in [150usize, 600, 1_100, 333, 777].into_iter().enumerate() {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "store_contract::crash_child",
                "--ignored",
                "--nocapture",
            ])
            .env("VERIGATE_CONTRACT_DIR", dir.path())
            .env("VERIGATE_CONTRACT_BACKEND", backend.name)
            .env("VERIGATE_CONTRACT_ROUND", round.to_string())
            .env(crate::postgres::OWNER, std::process::id().to_string())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let mut this_round = 0;
        for line in lines {
            let line = line.unwrap();
            if let Some(rest) = line.strip_prefix("acked ") {
                let (id, event) = rest.split_once(' ').unwrap();
                acked.push((id.to_owned(), event.to_owned()));
                this_round += 1;
                if this_round == kill_after {
                    break;
                }
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(
            this_round, kill_after,
            "{}: the child stopped early",
            backend.name
        );
        let store = (backend.open)(dir.path(), NumberPrivacy::Plain);
        let mut lost = Vec::new();
        for (id, event) in &acked {
            let record = store.verification(id).await.unwrap();
            let kept = match (event.as_str(), &record) {
                ("request", Some(r)) => r.decision.is_some(),
                ("result", Some(r)) => r.result.as_ref().is_some_and(|x| x.status == "FAIL"),
                _ => false,
            };
            if !kept {
                lost.push(format!("{id} ({event})"));
            }
        }
        assert!(
            lost.is_empty(),
            "{}: {} of {} acknowledged events lost after kill -9 in round {round}, e.g. {:?}",
            backend.name,
            lost.len(),
            acked.len(),
            &lost[..lost.len().min(5)]
        );
        // Replaying after a kill adds nothing twice: each event once in the raw log, each
        // request once in the number index.
        let mut logged = Vec::new();
        let mut after = None;
        loop {
            let page = store
                .events(EventQuery {
                    since: DateTime::<Utc>::UNIX_EPOCH,
                    until: DateTime::<Utc>::MAX_UTC,
                    after,
                    limit: 1000,
                })
                .await
                .unwrap();
            logged.extend(page.items.into_iter().map(|e| (e.id, e.event)));
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        let unique: HashSet<&(String, String)> = logged.iter().collect();
        assert_eq!(
            unique.len(),
            logged.len(),
            "{}: an event logged twice",
            backend.name
        );
        let requests: HashSet<&String> = acked
            .iter()
            .filter(|(_, e)| e == "request")
            .map(|(id, _)| id)
            .collect();
        let mut indexed = HashSet::new();
        let mut after = None;
        loop {
            let page = store
                .verifications(VerificationQuery {
                    after,
                    ..by(VerificationFilter {
                        number: Some("+46700000009".into()),
                        ..Default::default()
                    })
                })
                .await
                .unwrap();
            indexed.extend(page.items.into_iter().map(|r| r.id));
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        let missing: Vec<&&String> = requests
            .iter()
            .filter(|id| !indexed.contains(**id))
            .collect();
        assert!(
            missing.is_empty(),
            "{}: not in the number index: {missing:?}",
            backend.name
        );
        store.shutdown().await.unwrap();
    }
}

/// Runs every check of the contract against one backend: one test per check, named
/// after it, so a failure says which check and which backend.
macro_rules! contract_tests {
    ($module:ident, $backend:expr) => {
        contract_tests!(
            $module,
            $backend,
            duplicates_get_the_first_answer_and_change_nothing,
            concurrent_deliveries_of_one_event_are_admitted_once,
            an_event_the_store_refuses_fails_alone,
            a_long_reference_is_stored_and_found_by_it,
            events_join_into_one_record_whatever_their_order,
            events_arriving_together_join_into_one_record,
            a_numbers_recent_verifications_are_the_newest_of_the_window,
            a_verifications_own_events_are_found_among_others,
            listings_follow_creation_order_and_filters,
            pagination_has_no_gaps_under_concurrent_writes,
            retention_deletes_a_verification_with_everything_derived_from_it,
            hashed_numbers_are_found_but_never_kept,
            everything_survives_a_restart,
            acknowledged_writes_survive_a_kill_9,
        );
    };
    ($module:ident, $backend:expr, $($check:ident),+ $(,)?) => {
        mod $module {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    if ($backend.available)() {
                        super::$check(&$backend).await
                    }
                }
            )+
        }
    };
}

contract_tests!(sled, SLED);
contract_tests!(postgres, POSTGRES);
