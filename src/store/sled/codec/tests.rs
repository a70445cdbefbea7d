use chrono::TimeZone;
use proptest::prelude::*;

use super::{event::*, record::*, *};
use crate::{
    decision::{
        CounterReading, DecisionRecord, Explanation, PolicyDecision, QuarantineNote, ShadowMatch,
    },
    events::{Action, VerificationEvent},
    store::RecordStamp,
};

fn t(secs: i64, nanos: u32) -> DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000 + secs, nanos).unwrap()
}

/// A record shaped like the sample policy's: a request with nine counter readings, an
/// SMS receipt and a result.
fn sample() -> StoredVerification {
    let number = "+46701234567";
    let counters = [
        ("per-number-burst", "rate_limit", number, 1.0, 5.0),
        ("per-range-burst", "rate_limit", "+46701234", 3.0, 30.0),
        ("range-walking", "distinct_numbers", "+46701234", 2.0, 15.0),
        (
            "wide-range-walking",
            "distinct_numbers",
            "+4670123",
            7.0,
            40.0,
        ),
        ("country-spend-cap", "spend", "SE", 12.3456, 200.0),
        (
            "low-conversion-range",
            "conversion (0/0)",
            "+4670123",
            1.0,
            0.25,
        ),
        (
            "low-conversion-prefix",
            "conversion (1/2)",
            "+46701",
            0.879_168_728_331_569_4,
            0.3,
        ),
        ("sinch-flags-fraud", "sinch_fraud", "+4670123", 0.0, 3.0),
        ("global", "rate_limit", "global", 1234.0, 100_000.0),
    ];
    let decision = DecisionRecord {
        action: Action::Allow,
        rule: None,
        reason: "no rule matched; policy default".into(),
        on_error: false,
        policy_version: "9c636617f170".into(),
        decided_at: t(0, 123_456_789),
        answer: serde_json::json!({"action":"allow","sms":{"codeType":"Numeric","expiry":"00:10:00"}}),
        explanation: Explanation {
            shadow: vec![ShadowMatch {
                rule: "night-voice".into(),
                would: Action::Deny,
            }],
            country: Some("SE".into()),
            matched_prefix: None,
            counters: counters
                .iter()
                .map(|(rule, condition, key, value, max)| CounterReading {
                    rule: (*rule).into(),
                    condition: (*condition).into(),
                    key: (*key).into(),
                    value: *value,
                    max: *max,
                })
                .collect(),
            quarantine: Some(QuarantineNote {
                rule: "low-conversion-range".into(),
                key: "+4670123".into(),
                until: Some(t(3600, 0)),
                state: "probe".into(),
            }),
            policy_version: "9c636617f170".into(),
            eval_ns: 4_321,
        },
    };
    let request = format!(
        r#"{{"id":"1ce0ffee-0001","event":"VerificationRequestEvent","method":"sms","identity":{{"type":"number","endpoint":"{number}"}},"price":{{"amount":0.0308,"currencyId":"EUR"}},"rate":{{"amount":0.0,"currencyId":"EUR"}},"reference":"ref-0001","custom":"order 17","acceptLanguage":["sv-SE"]}}"#
    );
    let delivered = r#"{"id":"1ce0ffee-0001","event":"VerificationSmsDeliveredEvent","smsResult":"Successful"}"#;
    let result = r#"{"id":"1ce0ffee-0001","event":"VerificationResultEvent","method":"sms","status":"SUCCESSFUL","source":"manual"}"#;
    let facts = crate::phone::facts(number);
    let mut record = None;
    let mut accepted = Vec::new();
    for (seq, (body, at)) in [(request.as_str(), 0), (delivered, 2), (result, 40)]
        .into_iter()
        .enumerate()
    {
        let event = VerificationEvent::parse(body.as_bytes()).unwrap();
        let stamp = RecordStamp {
            app_key: "5F5C418A-0F91-4BBC-8234-A9BF5EDDAD97",
            seq: 100 + seq as u64,
            ordered_at: Utc.timestamp_millis_opt(1_800_000_000_000).unwrap(),
            received_at: t(at, 987_654_321),
        };
        let is_request = matches!(event, VerificationEvent::Request(_));
        record = Some(VerificationRecord::apply(
            record,
            &event,
            stamp,
            is_request.then_some((number, &facts)),
            is_request.then_some(&decision),
        ));
        accepted.push(Accepted {
            event: event.event_type().to_owned(),
            discriminator: if seq == 2 {
                "SUCCESSFUL".into()
            } else {
                String::new()
            },
            seq: 100 + seq as u64,
        });
    }
    StoredVerification {
        record: record.unwrap(),
        accepted,
    }
}

#[test]
fn a_record_reads_back_exactly_with_and_without_symbols() {
    let v = sample();
    let mut symbols = Symbols::default();
    let mut interned = Vec::new();
    encode_record(&v, &mut symbols, &mut interned);
    assert_eq!(decode_record(&interned, Some(&symbols)).unwrap(), v);
    let mut inline = Vec::new();
    encode_record(&v, &mut Inline, &mut inline);
    assert_eq!(decode_record(&inline, None).unwrap(), v);
    assert_eq!(
        record_stamp(&interned).unwrap(),
        Stamp::new(v.record.first_seen, v.record.seq)
    );
    // Symbols, number-relative keys and relative times are what make records small
    // (blocks of them are compressed on top of that).
    assert!(
        interned.len() * 5 < inline.len() * 2,
        "{} vs {}",
        interned.len(),
        inline.len()
    );
    assert!(interned.len() < 360, "{} bytes", interned.len());
}

#[test]
fn symbols_are_only_read_back_with_their_table() {
    let v = sample();
    let mut symbols = Symbols::default();
    let mut bytes = Vec::new();
    encode_record(&v, &mut symbols, &mut bytes);
    assert!(decode_record(&bytes, None).is_err());
    let reloaded = Symbols::load(
        symbols
            .unpersisted()
            .into_iter()
            .map(|(n, t)| (n, t.to_string())),
    )
    .unwrap();
    assert_eq!(decode_record(&bytes, Some(&reloaded)).unwrap(), v);
}

#[test]
fn hashed_numbers_and_long_strings_stay_inline() {
    let mut symbols = Symbols::default();
    assert!(symbols.intern("SE").is_some());
    assert!(symbols
        .intern(&format!("{HASH_PREFIX}{}", "ab".repeat(32)))
        .is_none());
    assert!(symbols.intern(&"x".repeat(MAX_SYMBOL_BYTES + 1)).is_none());
    assert_eq!(symbols.intern("SE"), symbols.intern("SE"));
}

#[test]
fn stats_read_only_what_they_need_and_agree_with_the_record() {
    let v = sample();
    let mut symbols = Symbols::default();
    let mut bytes = Vec::new();
    encode_record(&v, &mut symbols, &mut bytes);
    let from_bytes = with_stats_row(&bytes, &symbols, |row| format!("{row:?}")).unwrap();
    assert_eq!(from_bytes, format!("{:?}", v.record.stats_row()));
}

#[test]
fn write_ahead_log_entries_read_back_exactly() {
    let v = sample();
    let entry = WalEntry {
        event: LoggedEvent {
            stamp: Stamp { ms: 7, seq: 9 },
            received_at: t(5, 1),
            app_key: "app".into(),
            event: "VerificationResultEvent".into(),
            id: "x".into(),
            body: r#"{"id":"x","event":"VerificationResultEvent","status":"SUCCESSFUL"}"#.into(),
        },
        discriminator: "SUCCESSFUL".into(),
        number: Some(("+46701234567".into(), crate::phone::facts("+46701234567"))),
        decision: v.record.decision.clone(),
    };
    let bare = WalEntry {
        number: None,
        decision: None,
        ..entry.clone()
    };
    let batch = vec![entry, bare];
    let encoded = encode_wal_batch(&batch);
    assert_eq!(decode_wal_batch(&encoded).unwrap(), batch);
    // A log written before batches were compressed still reads after an upgrade.
    assert_eq!(encoded[0], COMPRESSED_WAL_FORMAT);
    let mut uncompressed = vec![ENTRY_FORMAT];
    uncompressed.extend(block::decompress(&encoded[1..]).unwrap());
    assert_eq!(decode_wal_batch(&uncompressed).unwrap(), batch);
}

#[test]
fn a_log_batch_of_similar_events_is_written_in_a_fraction_of_its_size() {
    let entries: Vec<WalEntry> = (0..12u64)
        .map(|k| WalEntry {
            event: LoggedEvent {
                stamp: Stamp { ms: 1_000 + k, seq: k },
                received_at: chrono::DateTime::UNIX_EPOCH,
                app_key: "5F5C418A-0F91-4BBC-8234-A9BF5EDDAD97".into(),
                event: "VerificationRequestEvent".into(),
                id: format!("1ce0ffee-{k:04}"),
                body: format!(
                    r#"{{"id":"1ce0ffee-{k:04}","event":"VerificationRequestEvent","method":"sms","identity":{{"type":"number","endpoint":"+467012345{k:02}"}},"price":{{"amount":0.0453,"currencyId":"EUR"}},"rate":{{"amount":0.0,"currencyId":"EUR"}}}}"#
                ),
            },
            discriminator: String::new(),
            number: None,
            decision: None,
        })
        .collect();
    let encoded = encode_wal_batch(&entries);
    let raw = block::decompress(&encoded[1..]).unwrap();
    assert!(
        encoded.len() * 2 < raw.len(),
        "{} of {}",
        encoded.len(),
        raw.len()
    );
    assert_eq!(decode_wal_batch(&encoded).unwrap(), entries);
}

#[test]
fn blocks_keep_their_items_in_order() {
    let items: Vec<Vec<u8>> = (0..100u8).map(|i| vec![i; usize::from(i)]).collect();
    let block = encode_block(items.iter().map(Vec::as_slice));
    assert_eq!(decode_block(&block).unwrap().to_vecs(), items);
    let event = LoggedEvent {
        stamp: Stamp { ms: 1, seq: 2 },
        received_at: t(0, 5),
        app_key: "app".into(),
        event: "VerificationRequestEvent".into(),
        id: "v".into(),
        body: "{\"id\":\"v\"}".into(),
    };
    let mut bytes = Vec::new();
    encode_event(&event, &mut bytes);
    assert_eq!(decode_event(&bytes).unwrap(), event);
}

#[test]
fn counts_are_written_as_varints_and_everything_else_exactly() {
    for v in [
        0.0,
        1.0,
        42.0,
        -3.0,
        1e15,
        0.5,
        -0.0,
        f64::MAX,
        1e300,
        0.1 + 0.2,
    ] {
        let back = Num::of(v).get();
        assert_eq!(back.to_bits(), v.to_bits(), "{v}");
    }
}

fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z_ -]{1,24}",
        "\\PC{0,40}",
        Just(format!("{HASH_PREFIX}{}", "0f".repeat(32))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Any record the merge can produce survives encoding, whatever its strings.
    #[test]
    fn any_decision_and_texts_read_back_exactly(
        reason in any_text(),
        rule in proptest::option::of(any_text()),
        key in any_text(),
        condition in any_text(),
        value in any::<f64>().prop_filter("not NaN", |v| !v.is_nan()),
        custom in proptest::option::of(any_text()),
        digits in "[1-9][0-9]{6,13}",
    ) {
        let mut v = sample();
        let number = format!("+{digits}");
        v.record.number = Some(number.clone());
        v.record.prefix = Some(number[..4].to_owned());
        v.record.custom = custom;
        let d = v.record.decision.as_mut().unwrap();
        d.reason = reason;
        d.rule = rule;
        d.explanation.counters[0].key = key;
        d.explanation.counters[0].condition = condition;
        d.explanation.counters[1].value = value;
        d.explanation.counters[2].key = number[..6].to_owned();
        let mut symbols = Symbols::default();
        let mut bytes = Vec::new();
        encode_record(&v, &mut symbols, &mut bytes);
        prop_assert_eq!(decode_record(&bytes, Some(&symbols)).unwrap(), v);
    }

    /// Garbage never panics the decoders.
    #[test]
    fn decoders_refuse_garbage_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let symbols = Symbols::default();
        let _ = decode_record(&bytes, Some(&symbols));
        let _ = with_stats_row(&bytes, &symbols, |_| ());
        let _ = decode_wal_batch(&bytes);
        let _ = decode_block(&bytes);
        let _ = decode_event(&bytes);
    }
}

#[test]
fn a_decision_made_by_the_policy_survives_the_log() {
    let decision = PolicyDecision {
        action: Action::Deny,
        rule: Some("blocked-numbers".into()),
        reason: "rule `blocked-numbers` matched".into(),
        response: Default::default(),
        explanation: Explanation::default(),
        spared: Vec::new(),
    };
    let record = DecisionRecord::new(
        &decision,
        false,
        "v1",
        t(0, 0),
        serde_json::json!({"action":"deny"}),
    );
    let entry = WalEntry {
        event: LoggedEvent {
            stamp: Stamp { ms: 1, seq: 1 },
            received_at: t(0, 0),
            app_key: "a".into(),
            event: "VerificationRequestEvent".into(),
            id: "v".into(),
            body: "{}".into(),
        },
        discriminator: String::new(),
        number: None,
        decision: Some(record),
    };
    let batch = vec![entry];
    assert_eq!(decode_wal_batch(&encode_wal_batch(&batch)).unwrap(), batch);
}

/// `VERIGATE_WRITE_FUZZ_SEEDS=1 cargo test fuzz_seeds` writes encoded samples as seeds for
/// fuzz/fuzz_targets/record_decode.rs; otherwise this checks the committed ones still
/// decode.
#[test]
fn fuzz_seeds_decode() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/record_decode");
    if std::env::var_os("VERIGATE_WRITE_FUZZ_SEEDS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        let v = sample();
        let mut inline = Vec::new();
        encode_record(&v, &mut Inline, &mut inline);
        let block = encode_block([inline.as_slice(), inline.as_slice()]);
        let wal = encode_wal_batch(&[WalEntry {
            event: LoggedEvent {
                stamp: Stamp { ms: 1, seq: 2 },
                received_at: t(0, 1),
                app_key: "app".into(),
                event: "VerificationRequestEvent".into(),
                id: "v".into(),
                body: "{}".into(),
            },
            discriminator: String::new(),
            number: Some(("+46701234567".into(), crate::phone::facts("+46701234567"))),
            decision: v.record.decision.clone(),
        }]);
        for (name, bytes) in [("record", inline), ("block", block), ("wal-batch", wal)] {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
    let seeds: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert!(seeds.len() >= 3);
    for seed in seeds {
        let bytes = std::fs::read(seed.unwrap().path()).unwrap();
        crate::store::sled::fuzz_decoders(&bytes);
        let decodes = decode_record(&bytes, None).is_ok()
            || decode_block(&bytes).is_ok()
            || decode_wal_batch(&bytes).is_ok();
        assert!(decodes, "a seed that decodes as nothing");
    }
}
