//! The docs are true of the code where a machine can tell: every relative link (and its
//! `#anchor`) in README.md and docs/ leads somewhere, and every `killswitch` command they quote,
//! in code blocks or inline, parses with the real command line.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// README.md and every Markdown file under docs/.
fn documents() -> Vec<PathBuf> {
    let mut all = vec![root().join("README.md")];
    for entry in std::fs::read_dir(root().join("docs")).unwrap().flatten() {
        if entry.path().extension().is_some_and(|e| e == "md") {
            all.push(entry.path());
        }
    }
    all.sort();
    all
}

/// GitHub's anchor for a heading: lower case, spaces to '-', other punctuation dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim_start_matches('#')
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(text: &str) -> Vec<String> {
    let mut in_code = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        } else if !in_code && line.starts_with('#') {
            out.push(anchor(line));
        }
    }
    out
}

/// `(line, target)` of every Markdown link `[..](target)` outside code blocks.
fn links(text: &str) -> Vec<(usize, String)> {
    let mut in_code = false;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(end) = after.find(')') else { break };
            out.push((n + 1, after[..end].to_owned()));
            rest = &after[end..];
        }
    }
    out
}

#[test]
fn every_relative_link_in_the_docs_leads_somewhere() {
    let mut broken = Vec::new();
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).unwrap();
        for (line, target) in links(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, fragment) = target.split_once('#').unwrap_or((&target, ""));
            let file = if path.is_empty() {
                doc.clone()
            } else {
                doc.parent().unwrap().join(path)
            };
            let name = format!("{}:{line}: {target}", doc.display());
            if !file.exists() {
                broken.push(format!("{name}: no such file"));
                continue;
            }
            if !fragment.is_empty() && file.extension().is_some_and(|e| e == "md") {
                let target_text = std::fs::read_to_string(&file).unwrap();
                if !anchors(&target_text).iter().any(|a| a == fragment) {
                    broken.push(format!("{name}: no heading #{fragment}"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// Every `killswitch ...` command a document quotes: lines of code blocks (after `$ ` or
/// `sudo `), and inline code spans. Placeholders like PATH are ordinary words to the parser.
fn quoted_commands(text: &str) -> Vec<(usize, String)> {
    let mut in_code = false;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.starts_with("```") {
            in_code = !in_code;
            continue;
        }
        let mut candidates: Vec<String> = Vec::new();
        if in_code {
            candidates.push(line.trim().to_owned());
        } else {
            candidates.extend(line.split('`').skip(1).step_by(2).map(str::to_owned));
        }
        for candidate in candidates {
            let command = candidate
                .trim_start_matches("$ ")
                .trim_start_matches("sudo ")
                .trim();
            if command.starts_with("killswitch ") || command == "killswitch" {
                out.push((n + 1, command.to_owned()));
            }
        }
    }
    out
}

/// The command alone: up to a comment, a pipe, a redirection or a `&&`/`;`. A synopsis is read
/// as its shortest form: `[...]` parts dropped, the first of `a|b|c`.
fn words(command: &str) -> Option<Vec<String>> {
    let command = command.replace("\\|", "|");
    let mut kept = Vec::new();
    let mut optional = 0;
    for word in shell_words::split(&command).ok()? {
        if ["|", "||", "&&", ";", ">", ">>", "<", "2>&1"].contains(&word.as_str())
            || word.starts_with('#')
        {
            break;
        }
        let opens = word.matches('[').count();
        let closes = word.matches(']').count();
        // `[2001:db8::7]:443/tcp` is an endpoint, not an optional part.
        if word.starts_with('[') && !word.contains("]:") || optional > 0 {
            optional += opens;
            optional = optional.saturating_sub(closes);
            continue;
        }
        match word.split_once('|') {
            Some((first, _)) => kept.push(first.to_owned()),
            None => kept.push(word),
        }
    }
    Some(kept)
}

/// nftables log prefixes, which read like commands.
const LOG_PREFIXES: [&str; 2] = ["killswitch drop", "killswitch lockdown"];

#[test]
fn every_killswitch_command_quoted_in_the_docs_parses() {
    let mut wrong = Vec::new();
    let mut seen = 0;
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).unwrap();
        for (line, command) in quoted_commands(&text) {
            // An inline span that is a shell fragment ("killswitch up && ...") is cut as above;
            // one that cannot be split (an unclosed quote) is reported too.
            if LOG_PREFIXES.iter().any(|p| command.starts_with(p)) {
                continue;
            }
            let Some(args) = words(&command) else {
                wrong.push(format!("{}:{line}: {command}: cannot split", doc.display()));
                continue;
            };
            seen += 1;
            use clap::error::ErrorKind::*;
            match killswitch::cli::command().try_get_matches_from(&args) {
                Ok(_) => {}
                // A command named, not run: `killswitch servers`, `killswitch run`, or an
                // option mentioned without its value (`killswitch down --cgroup`).
                Err(e)
                    if matches!(
                        e.kind(),
                        DisplayHelp
                            | DisplayVersion
                            | DisplayHelpOnMissingArgumentOrSubcommand
                            | MissingRequiredArgument
                    ) => {}
                Err(e)
                    if e.kind() == InvalidValue
                        && args.last().is_some_and(|a| a.starts_with("--")) => {}
                Err(e) => wrong.push(format!(
                    "{}:{line}: {command}: {}",
                    doc.display(),
                    e.to_string().lines().next().unwrap_or_default()
                )),
            }
        }
    }
    assert!(seen > 50, "only {seen} commands found: the scan is broken");
    assert!(
        wrong.is_empty(),
        "commands that do not parse:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_link_and_command_scanners_see_what_they_should() {
    let text = "See [a](b.md#c) and `killswitch up --cgroup x`.\n```sh\nsudo killswitch status --json | jq .\n```\n";
    assert_eq!(links(text), vec![(1, "b.md#c".to_owned())]);
    let commands = quoted_commands(text);
    assert_eq!(commands.len(), 2, "{commands:?}");
    assert_eq!(
        words(&commands[1].1).unwrap(),
        ["killswitch", "status", "--json"]
    );
    assert_eq!(anchor("## What it is"), "what-it-is");
    assert!(Path::new(&root()).join("docs").exists());
}
