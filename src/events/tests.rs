use super::*;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn every_sinch_sample_event_parses_to_its_type() {
    let dir = format!("{}/tests/fixtures/events", env!("CARGO_MANIFEST_DIR"));
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let body = std::fs::read(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let parsed = VerificationEvent::parse(&body);
        if name.contains("authorization.helper") {
            // A signed fragment without `event`: not a callback on its own.
            assert!(matches!(parsed, Err(EventError::Invalid(_))), "{name}");
            continue;
        }
        let event = parsed.unwrap_or_else(|e| panic!("{name}: {e}"));
        let expected = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["event"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(event.event_type(), expected, "{name}");
        assert!(
            !matches!(event, VerificationEvent::Unknown { .. }),
            "{name}"
        );
        seen += 1;
    }
    assert_eq!(seen, 14);
}

#[test]
fn request_event_fields_are_read() {
    let body =
        fixture("events/sinch-sdk-dotnet__VerificationHooksTests-VerificationRequestEvent.json");
    let VerificationEvent::Request(e) = VerificationEvent::parse(&body).unwrap() else {
        panic!("not a request event")
    };
    assert_eq!(e.id, "1234567890");
    assert_eq!(e.method, VerificationMethod::Sms);
    assert_eq!(e.identity.endpoint, "+11235551234");
    assert_eq!(e.price.unwrap().amount, Some(10.5));
    assert_eq!(e.reference.as_deref(), Some("string"));
    assert_eq!(e.accept_language, Some(vec!["es-ES".to_owned()]));
}

#[test]
fn method_values_are_case_insensitive_and_open_ended() {
    for (raw, expected) in [
        ("flashcall", VerificationMethod::FlashCall),
        ("flashCall", VerificationMethod::FlashCall),
        ("SMS", VerificationMethod::Sms),
        ("WhatsApp", VerificationMethod::WhatsApp),
        ("seamless", VerificationMethod::Seamless),
        (
            "carrierPigeon",
            VerificationMethod::Other("carrierpigeon".into()),
        ),
    ] {
        assert_eq!(VerificationMethod::parse(raw), expected, "{raw}");
    }
}

#[test]
fn unknown_event_types_and_fields_are_accepted() {
    let e = VerificationEvent::parse(br#"{"id":"x","event":"VerificationFutureEvent","new":1}"#)
        .unwrap();
    assert_eq!(
        e,
        VerificationEvent::Unknown {
            id: "x".into(),
            event: "VerificationFutureEvent".into()
        }
    );
    let e = VerificationEvent::parse(
        br#"{"id":"x","event":"VerificationResultEvent","status":"NEWSTATUS","rate":{"amount":1},"identity":{"type":"number","endpoint":"+1","verified":true}}"#,
    )
    .unwrap();
    assert!(matches!(e, VerificationEvent::Result(r) if r.status == "NEWSTATUS"));
}

#[test]
fn bodies_that_are_not_callbacks_are_rejected_with_a_reason() {
    let cases: [(&[u8], &str); 10] = [
        (b"", "body is not valid JSON"),
        (b"{\"id\":", "body is not valid JSON"),
        (b"\xff\xfe", "body is not valid JSON"),
        (b"[1,2]", "JSON object"),
        (br#"{"event":"VerificationResultEvent"}"#, "`id` is missing"),
        (br#"{"id":"1"}"#, "`event` is missing"),
        (br#"{"id":1,"event":"VerificationResultEvent"}"#, "`id` must be a string"),
        (br#"{"id":"","event":"VerificationResultEvent"}"#, "non-empty"),
        (br#"{"id":"1","event":"VerificationRequestEvent","method":"sms"}"#, "identity"),
        (
            br#"{"id":"1","event":"VerificationRequestEvent","method":"sms","identity":{"endpoint":"+1"},"price":{"amount":"ten"}}"#,
            "invalid type",
        ),
    ];
    for (body, needle) in cases {
        let err = VerificationEvent::parse(body).unwrap_err().to_string();
        assert!(
            err.contains(needle),
            "{:?}: {err}",
            String::from_utf8_lossy(body)
        );
    }
}

#[test]
fn duplicate_keys_are_rejected() {
    let body =
        br#"{"id":"1","event":"VerificationResultEvent","status":"FAIL","status":"SUCCESSFUL"}"#;
    assert!(VerificationEvent::parse(body)
        .unwrap_err()
        .to_string()
        .contains("duplicate"));
}

#[test]
fn answers_carry_only_the_key_of_the_requested_method() {
    let fields = ResponseFields {
        sms: Some(SmsResponse {
            code_type: Some("Numeric".into()),
            expiry: Some("00:05:00".into()),
            ..Default::default()
        }),
        flash_call: Some(FlashCallResponse {
            dial_timeout: Some(10),
            ..Default::default()
        }),
        callout: Some(CalloutResponse {
            code: None,
            speech: Some(Speech {
                locale: "en-US".into(),
            }),
        }),
        whatsapp: Some(WhatsAppResponse {
            code_type: Some("Alpha".into()),
            accept_language: None,
        }),
    };
    let answer = |m: VerificationMethod| {
        serde_json::to_value(CallbackResponse {
            action: Action::Allow,
            fields: fields.for_method(&m),
        })
        .unwrap()
    };
    assert_eq!(
        answer(VerificationMethod::Sms),
        serde_json::json!({"action":"allow","sms":{"codeType":"Numeric","expiry":"00:05:00"}})
    );
    assert_eq!(
        answer(VerificationMethod::FlashCall),
        serde_json::json!({"action":"allow","flashCall":{"dialTimeout":10}})
    );
    assert_eq!(
        answer(VerificationMethod::Callout),
        serde_json::json!({"action":"allow","callout":{"speech":{"locale":"en-US"}}})
    );
    assert_eq!(
        answer(VerificationMethod::WhatsApp),
        serde_json::json!({"action":"allow","whatsapp":{"codeType":"Alpha"}})
    );
    assert_eq!(
        answer(VerificationMethod::Seamless),
        serde_json::json!({"action":"allow"})
    );
}

#[test]
fn answers_match_sinch_published_examples() {
    // OAS 2.0.1 examples, byte-for-byte as JSON values.
    let sms: serde_json::Value = serde_json::from_slice(&fixture(
        "responses/sinch-oas-2.0.1__SmsRequestEventResponse.json",
    ))
    .unwrap();
    let ours = CallbackResponse {
        action: Action::Allow,
        fields: ResponseFields {
            sms: Some(SmsResponse {
                code: sms["sms"]["code"].as_str().map(str::to_owned),
                accept_language: Some(vec!["en-US".into()]),
                ..Default::default()
            }),
            ..Default::default()
        },
    };
    assert_eq!(serde_json::to_value(ours).unwrap(), sms);
    assert_eq!(
        serde_json::to_string(&CallbackResponse::bare(Action::Deny)).unwrap(),
        r#"{"action":"deny"}"#
    );
}

#[test]
fn a_nul_character_anywhere_is_refused_but_an_escaped_backslash_before_u0000_is_not() {
    let with = |custom: &str| {
        format!(
            r#"{{"id":"n1","event":"VerificationRequestEvent","method":"sms",
                "identity":{{"type":"number","endpoint":"+46700000001"}},"custom":"{custom}"}}"#
        )
    };
    for nul in [r"a\u0000b", r"\u0000", r"x\\\u0000"] {
        let refused = VerificationEvent::parse(with(nul).as_bytes());
        assert!(
            matches!(&refused, Err(EventError::Invalid(m)) if m.contains("NUL")),
            "{nul}: {refused:?}"
        );
    }
    // `\\u0000` is a backslash followed by the text u0000.
    for fine in [r"\\u0000", r"\u0001", r"u0000"] {
        assert!(
            VerificationEvent::parse(with(fine).as_bytes()).is_ok(),
            "{fine}"
        );
    }
}

#[test]
fn numbers_and_methods_past_their_bounds_are_refused_but_any_reference_is_taken() {
    let event = |number: &str, method: &str, reference: &str| {
        format!(
            r#"{{"id":"l1","event":"VerificationRequestEvent","method":"{method}",
                "identity":{{"type":"number","endpoint":"{number}"}},"reference":"{reference}"}}"#
        )
    };
    let long = |n: usize| "1".repeat(n);
    assert!(VerificationEvent::parse(event(&long(256), "sms", &long(100_000)).as_bytes()).is_ok());
    for (body, field) in [
        (event(&long(257), "sms", "r"), "identity.endpoint"),
        (event("+46700000001", &long(257), "r"), "method"),
    ] {
        let refused = VerificationEvent::parse(body.as_bytes());
        assert!(
            matches!(&refused, Err(EventError::Invalid(m)) if m.contains(field)),
            "{field}: {refused:?}"
        );
    }
}

proptest::proptest! {
    #[test]
    fn the_parser_never_panics(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
        let _ = VerificationEvent::parse(&body);
    }
}
