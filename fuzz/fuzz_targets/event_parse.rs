//! Callback bodies: any bytes, after authentication.
#![no_main]

use libfuzzer_sys::fuzz_target;
use verigate::events::VerificationEvent;

fuzz_target!(|body: &[u8]| {
    if let Ok(event) = VerificationEvent::parse(body) {
        // A parsed event always has the id and type the store and policy key on.
        assert!(!event.id().is_empty());
        assert!(!event.event_type().is_empty());
        let _ = event.number().map(verigate::phone::is_e164);
    }
});
