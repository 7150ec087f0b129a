//! `ordo registry`: the operation registry in Redis (crate `ordo-registry`).
//! Publish a file as a new immutable version (it becomes active), list the
//! versions, show one's file, diff two, pin every service to one, unpin,
//! and roll back to the version before the active one.
//!
//! A file is checked before anything is written: a bad one is refused with
//! `FILE: line L, column C: message` on stderr, exit code 1, and the registry
//! is left as it was.

use std::{fmt::Write as _, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use ordo_registry::{Catalog, OperationSpec, State, Store, Summary, diff, document};

use crate::display::utc;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Redis holding the registry (the one the harmonizers and workers follow).
    #[arg(long, env = "ORDO_REDIS_URL", default_value = "redis://127.0.0.1:6379", global = true)]
    redis_url: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Check FILE and publish it as the next version, which becomes active.
    ///
    /// Prints the new version and what changed from the version that was
    /// active. Services that follow the registry use it within a second. A
    /// bad file exits 1 with `FILE: line L, column C: message` and changes nothing.
    Publish {
        /// The registry file (TOML, one [[operation]] table per operation).
        file: PathBuf,
    },
    /// Every published version, oldest first: `version published operations [active] [pinned] [(in use)]`.
    List,
    /// Print a version's file as it was published (default: the version in use).
    Show {
        /// The version (see `list`).
        version: Option<u64>,
    },
    /// What changed from version FROM to version TO: `+ op`, `- op`, `~ op: field old -> new`.
    Diff { from: u64, to: u64 },
    /// Make every service that follows the registry use VERSION, whatever is
    /// published later, until `unpin`.
    Pin { version: u64 },
    /// Remove the pin: services follow the active version again.
    Unpin,
    /// Make the version before the active one active.
    Rollback,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    // A bad file is refused before Redis is even contacted.
    let file = match &args.command {
        Command::Publish { file } => match check_file(file)? {
            Ok(text) => Some(text),
            Err(message) => {
                eprintln!("{message}");
                return Ok(ExitCode::FAILURE);
            }
        },
        _ => None,
    };
    let url = args.redis_url.as_str();
    let conn = ordo_runtime::redis_conn::connect(url)?;
    let store = Store::new(conn);
    let outcome = match args.command {
        Command::Publish { .. } => publish(&store, file.as_deref().unwrap_or_default()).await,
        Command::List => list(&store).await,
        Command::Show { version } => show(&store, version).await,
        Command::Diff { from, to } => diff_versions(&store, from, to).await,
        Command::Pin { version } => pin(&store, version).await,
        Command::Unpin => unpin(&store).await,
        Command::Rollback => rollback(&store).await,
    };
    outcome.with_context(|| format!("operation registry at {url}"))?;
    Ok(ExitCode::SUCCESS)
}

/// Reads and checks a registry file: `Ok(Ok(text))` when it is valid,
/// `Ok(Err(message))` with `FILE: line L, column C: message` when it is not.
fn check_file(path: &std::path::Path) -> anyhow::Result<Result<String, String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(match document::parse(&text) {
        Ok(_) => Ok(text),
        Err(error) => Err(format!("{}: {error}", path.display())),
    })
}

async fn publish(store: &Store, text: &str) -> anyhow::Result<()> {
    let before = store.state().await?;
    let version = store.publish(text).await?;
    let published = store.require(version).await?;
    println!("published version {version} ({} operations); it is active", published.catalog.operations.len());
    if before.active > 0
        && let Some(previous) = store.get(before.active).await?
    {
        let changes = diff::diff(&previous.catalog, &published.catalog);
        if changes.is_empty() {
            println!("no changes from version {}", before.active);
        } else {
            println!("changes from version {}:", before.active);
            for change in changes {
                println!("  {change}");
            }
        }
    }
    if let Some(pin) = before.pin {
        eprintln!("note: the registry is pinned to version {pin}: services keep using it until `ordo registry unpin`");
    }
    Ok(())
}

async fn list(store: &Store) -> anyhow::Result<()> {
    let state = store.state().await?;
    let versions = store.list().await?;
    if versions.is_empty() {
        // On stderr: stdout stays one line per version.
        eprintln!("no version published: services use their built-in operations (`ordo registry publish FILE`)");
    }
    for summary in &versions {
        println!("{}", list_line(summary, &state));
    }
    Ok(())
}

/// `  3  2026-12-01T08:22:03.000Z  12 operations  active (in use)`.
fn list_line(summary: &Summary, state: &State) -> String {
    let mut line =
        format!("{:>3}  {}  {} operations", summary.version, utc(summary.published_unix_ms), summary.operations);
    let mut marks = Vec::new();
    if summary.version == state.active {
        marks.push("active");
    }
    if state.pin == Some(summary.version) {
        marks.push("pinned");
    }
    if !marks.is_empty() {
        let _ = write!(line, "  {}", marks.join(", "));
    }
    if summary.version == state.effective() {
        line.push_str(" (in use)");
    }
    line
}

async fn show(store: &Store, version: Option<u64>) -> anyhow::Result<()> {
    let version = match version {
        Some(version) => version,
        None => match store.state().await?.effective() {
            0 => anyhow::bail!("no version published yet: services use their built-in operations"),
            version => version,
        },
    };
    let published = store.require(version).await?;
    eprintln!("# version {version}, published {}", utc(published.catalog.published_unix_ms));
    let text = if published.source.is_empty() { render(&published.catalog) } else { published.source };
    print!("{text}");
    if !text.ends_with('\n') {
        println!();
    }
    Ok(())
}

/// A registry file for `catalog` (for versions stored without their file).
fn render(catalog: &Catalog) -> String {
    let mut out = String::new();
    for op in catalog.operations.values() {
        out.push_str(&render_operation(op));
    }
    out
}

fn render_operation(op: &OperationSpec) -> String {
    let mut out = format!("[[operation]]\nname = {}\n", toml_string(&op.name));
    for (field, value) in op.fields() {
        match field {
            "concurrency" | "attempts" => {
                let _ = writeln!(out, "{field} = {value}");
            }
            _ => {
                let _ = writeln!(out, "{field} = {}", toml_string(&value));
            }
        }
    }
    out.push('\n');
    out
}

/// A TOML basic string.
fn toml_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

async fn diff_versions(store: &Store, from: u64, to: u64) -> anyhow::Result<()> {
    let (old, new) = (store.require(from).await?, store.require(to).await?);
    let changes = diff::diff(&old.catalog, &new.catalog);
    if changes.is_empty() {
        eprintln!("versions {from} and {to} define the same operations");
    }
    for change in changes {
        println!("{change}");
    }
    Ok(())
}

async fn pin(store: &Store, version: u64) -> anyhow::Result<()> {
    store.pin(version).await?;
    let state = store.state().await?;
    println!(
        "pinned version {version}: services that follow the registry use it until `ordo registry unpin` \
         (active: {})",
        state.active
    );
    Ok(())
}

async fn unpin(store: &Store) -> anyhow::Result<()> {
    let removed = store.unpin().await?;
    let state = store.state().await?;
    match removed {
        Some(old) => println!("unpinned (was version {old}); services follow the active version {}", state.active),
        None => println!("the registry was not pinned; services follow the active version {}", state.active),
    }
    Ok(())
}

async fn rollback(store: &Store) -> anyhow::Result<()> {
    let (from, to) = store.rollback().await?;
    println!("rolled back: version {to} is active (was {from})");
    if let Some(pin) = store.state().await?.pin {
        eprintln!("note: the registry is pinned to version {pin}: services keep using it until `ordo registry unpin`");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::Parser as _;
    use ordo_registry::{Endpoint, Kind};

    use super::*;

    #[test]
    fn list_lines_mark_active_pinned_and_in_use() {
        let summary = |version| Summary { version, published_unix_ms: 1_700_000_000_123, operations: 12 };
        let state = State { latest: 3, active: 3, pin: None };
        assert_eq!(list_line(&summary(3), &state), "  3  2023-11-14T22:13:20.123Z  12 operations  active (in use)");
        assert_eq!(list_line(&summary(2), &state), "  2  2023-11-14T22:13:20.123Z  12 operations");
        let pinned = State { pin: Some(1), ..state };
        assert!(list_line(&summary(1), &pinned).ends_with("  pinned (in use)"));
        assert!(list_line(&summary(3), &pinned).ends_with("  active"));
        let both = State { pin: Some(3), ..state };
        assert!(list_line(&summary(3), &both).ends_with("  active, pinned (in use)"));
    }

    #[test]
    fn a_bad_file_is_refused_with_its_name_and_line() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "[[operation]]\nname = \"a\"\nkind = \"sideways\"\n").expect("write");
        let message = check_file(&path).expect("readable").expect_err("refused");
        assert_eq!(
            message,
            format!(
                "{}: line 3, column 8: kind \"sideways\" is not one of \"stateful\", \"stateless\"",
                path.display()
            )
        );
        std::fs::write(&path, "[[operation]]\nname = \"a\"\nkind = \"stateful\"\n").expect("write");
        assert!(check_file(&path).expect("readable").is_ok());
        assert!(check_file(&dir.path().join("missing.toml")).is_err(), "an unreadable file is an error");
    }

    #[test]
    fn a_rendered_catalog_parses_back_to_the_same_operations() {
        let ops = [
            OperationSpec::new("echo", Kind::Stateless).with_description("says it \"back\"\n\\ \u{7} é"),
            OperationSpec {
                endpoint: Some(Endpoint::Grpc("http://127.0.0.1:50070".into())),
                timeout: Some(Duration::from_millis(1500)),
                concurrency: Some(8),
                attempts: Some(2),
                gap_timeout: Some(None),
                ..OperationSpec::new("shout", Kind::Stateful)
            },
        ];
        let catalog = Catalog::new(1, 0, ops.clone());
        let parsed = document::parse(&render(&catalog)).expect("the rendering is a valid file");
        assert_eq!(parsed, ops.to_vec());
    }

    #[derive(Debug, clap::Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn the_redis_url_goes_before_or_after_the_subcommand() {
        let before = Wrapper::try_parse_from(["ordo", "--redis-url", "redis://h:1", "pin", "3"]).expect("parses");
        assert_eq!(before.args.redis_url, "redis://h:1");
        assert!(matches!(before.args.command, Command::Pin { version: 3 }));
        let after = Wrapper::try_parse_from(["ordo", "diff", "1", "2", "--redis-url", "redis://h:2"]).expect("parses");
        assert_eq!(after.args.redis_url, "redis://h:2");
        let show = Wrapper::try_parse_from(["ordo", "show"]).expect("parses");
        assert!(matches!(show.args.command, Command::Show { version: None }));
    }
}
