//! The input of the paper's experiment: the first 2048 characters of
//! Shakespeare's sonnets without whitespace, read from the shared data
//! directory (`../shared` next to the workspace, or `$ORDO_SHARED_DIR`).

use std::path::PathBuf;

/// Length of the paper's input text.
pub const SONNETS_LEN: usize = 2048;

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The shared directory: `$ORDO_SHARED_DIR`, else `<workspace>/../shared`.
pub fn shared_dir() -> PathBuf {
    match std::env::var_os("ORDO_SHARED_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => workspace_root().join("../shared"),
    }
}

/// `data/sonnets.txt` with every whitespace and control character removed,
/// cut to its first [`SONNETS_LEN`] bytes.
///
/// # Panics
/// When the file is missing, not ASCII, or too short.
pub fn sonnets_text() -> String {
    let path = shared_dir().join("data/sonnets.txt");
    let raw = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e} (set ORDO_SHARED_DIR?)", path.display()));
    assert!(raw.is_ascii(), "{} is not ASCII", path.display());
    let text: String = raw.chars().filter(|c| !c.is_whitespace() && !c.is_control()).collect();
    assert!(
        text.len() >= SONNETS_LEN,
        "{} has only {} non-whitespace characters, {SONNETS_LEN} needed",
        path.display(),
        text.len()
    );
    text[..SONNETS_LEN].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sonnets_are_2048_visible_ascii_characters() {
        let text = sonnets_text();
        assert_eq!(text.len(), SONNETS_LEN);
        assert!(text.bytes().all(|b| b.is_ascii_graphic()));
        assert!(text.starts_with("THESONNETS"), "{}", &text[..20]);
    }
}
