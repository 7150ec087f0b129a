//! `rust-worker`: a worker of your own in a few lines. It runs the
//! operation `reverse` (the characters of the UTF-8 payload in reverse
//! order, after a small random delay, so results finish out of order and
//! Ordo puts them back in order). Everything else — concurrency,
//! cancellation, retries, delivery to the reassemblers, the registry,
//! health, tracing, graceful shutdown, the flags (`rust-worker --help`) —
//! comes with `ordo-worker`. See README.md for how to run it.

use std::time::Duration;

use ordo_worker::{Bytes, OpError, Operations};
use rand::Rng;

/// The characters of `payload` in reverse order.
fn reverse(payload: &[u8]) -> Result<Bytes, OpError> {
    let text = std::str::from_utf8(payload).map_err(|e| OpError::permanent(format!("payload is not UTF-8: {e}")))?;
    Ok(Bytes::from(text.chars().rev().collect::<String>()))
}

fn main() -> std::process::ExitCode {
    let operations = Operations::new().with_fn(
        "reverse",
        "the payload's characters in reverse order, after a random delay of up to 50 ms",
        |_ctx, event| async move {
            let delay = Duration::from_millis(rand::rng().random_range(0..=50));
            tokio::time::sleep(delay).await;
            reverse(&event.payload)
        },
    );
    ordo_worker::main("rust-worker", operations)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reverses_characters_and_refuses_invalid_utf8() {
        assert_eq!(super::reverse("héllo".as_bytes()).expect("utf-8"), "olléh");
        let error = super::reverse(&[0xff, 0xfe]).expect_err("not utf-8");
        assert!(!error.transient && error.message.contains("UTF-8"), "{error}");
    }
}
