//! What changed between two versions, operation by operation and field by
//! field (`ordo registry diff N M`).

use crate::spec::Catalog;

/// One difference, printed as a line: `+ name`, `- name` or
/// `~ name: field old -> new`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Added(String),
    Removed(String),
    Changed { operation: String, field: &'static str, from: String, to: String },
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Added(name) => write!(f, "+ {name}"),
            Change::Removed(name) => write!(f, "- {name}"),
            Change::Changed { operation, field, from, to } => {
                let show = |v: &str| if v.is_empty() { "(unset)".to_owned() } else { format!("{v:?}") };
                write!(f, "~ {operation}: {field} {} -> {}", show(from), show(to))
            }
        }
    }
}

/// Differences from `old` to `new`, by operation name, then field.
pub fn diff(old: &Catalog, new: &Catalog) -> Vec<Change> {
    let mut out = Vec::new();
    for (name, before) in &old.operations {
        let Some(after) = new.operations.get(name) else {
            out.push(Change::Removed(name.clone()));
            continue;
        };
        let (before, after) = (before.fields(), after.fields());
        let mut names: Vec<&'static str> = before.iter().chain(after.iter()).map(|(k, _)| *k).collect();
        names.sort_unstable();
        names.dedup();
        for field in names {
            let get = |fields: &[(&'static str, String)]| {
                fields.iter().find(|(k, _)| *k == field).map(|(_, v)| v.clone()).unwrap_or_default()
            };
            let (from, to) = (get(&before), get(&after));
            if from != to {
                out.push(Change::Changed { operation: name.clone(), field, from, to });
            }
        }
    }
    for name in new.operations.keys() {
        if !old.operations.contains_key(name) {
            out.push(Change::Added(name.clone()));
        }
    }
    out.sort_by(|a, b| key(a).cmp(key(b)));
    out
}

fn key(change: &Change) -> &str {
    match change {
        Change::Added(name) | Change::Removed(name) => name,
        Change::Changed { operation, .. } => operation,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::spec::{Kind, OperationSpec};

    #[test]
    fn diff_lists_added_removed_and_changed_fields() {
        let a = Catalog::new(
            1,
            0,
            [
                OperationSpec::new("keep", Kind::Stateful),
                OperationSpec::new("gone", Kind::Stateless),
                OperationSpec { timeout: Some(Duration::from_secs(5)), ..OperationSpec::new("slow", Kind::Stateful) },
            ],
        );
        let b = Catalog::new(
            2,
            0,
            [
                OperationSpec::new("keep", Kind::Stateful),
                OperationSpec::new("new", Kind::Stateful),
                OperationSpec {
                    timeout: Some(Duration::from_secs(2)),
                    attempts: Some(4),
                    ..OperationSpec::new("slow", Kind::Stateful)
                },
            ],
        );
        let lines: Vec<String> = diff(&a, &b).iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            vec![
                "- gone".to_owned(),
                "+ new".to_owned(),
                "~ slow: attempts (unset) -> \"4\"".to_owned(),
                "~ slow: timeout \"5s\" -> \"2s\"".to_owned(),
            ]
        );
        assert!(diff(&a, &a).is_empty());
    }
}
