//! The Authorization header parser takes any bytes an attacker sends.
#![no_main]

use libfuzzer_sys::fuzz_target;
use verigate::signature::CallbackSignature;

fuzz_target!(|header: &[u8]| {
    if let Ok(CallbackSignature::Application { key, signature }) = CallbackSignature::parse(header)
    {
        // What was parsed came from the header, and the key is never empty.
        assert!(!key.is_empty());
        let text = String::from_utf8_lossy(header);
        assert!(text.contains(key) && text.contains(signature));
    }
});
