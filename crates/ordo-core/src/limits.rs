//! Protocol knowledge every service shares, in one place: the limits an
//! event is validated against and the attribute names Ordo itself reads.

/// Longest accepted `stream_id`, in bytes.
pub const MAX_STREAM_ID_BYTES: usize = 256;
/// Most attributes on one event.
pub const MAX_ATTRIBUTES: usize = 64;
/// Longest attribute (name + value), in bytes.
pub const MAX_ATTRIBUTE_BYTES: usize = 4096;
/// Longest operation name, in bytes.
pub const MAX_OPERATION_BYTES: usize = 128;
/// Largest accepted sequence number: 2^53 − 1. The release script (Lua in
/// Redis) holds sequences as doubles, which are exact only up to 2^53; above
/// it two sequences would share one slot and a stream would be released out
/// of order or lose results, so larger sequences are refused instead
/// (INVALID_ARGUMENT). A stream starts at 0, so no real stream comes near it.
pub const MAX_SEQUENCE: u64 = (1 << 53) - 1;
/// Most bytes of client input echoed back in an error message or a REJECTED
/// result (longer input is cut, with its full length said).
pub const MAX_ECHO_BYTES: usize = 64;

/// Attribute: the simulated callback latency (`fixed:10ms`, `exp:5ms`, ...).
pub const LATENCY_ATTRIBUTE: &str = "latency";
/// Attribute: the stateless operation the `callback` operation calls.
pub const CALL_ATTRIBUTE: &str = "call";
/// Attribute: the stream's gap timeout (`off` or a duration).
pub const GAP_TIMEOUT_ATTRIBUTE: &str = "gap-timeout";

/// `text` cut to at most [`MAX_ECHO_BYTES`] on a char boundary, saying how
/// long it was when cut: safe to put in any message sent back to a client.
pub fn echo(text: &str) -> String {
    if text.len() <= MAX_ECHO_BYTES {
        return text.to_owned();
    }
    let mut end = MAX_ECHO_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], text.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_cuts_long_input_on_a_char_boundary() {
        assert_eq!(echo("short"), "short");
        let long = "é".repeat(1000);
        let cut = echo(&long);
        assert!(cut.len() < MAX_ECHO_BYTES + 20, "{cut}");
        assert!(cut.ends_with("(2000 bytes)"), "{cut}");
    }
}
