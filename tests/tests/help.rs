//! The command line a person reads: `--help` of every command against its golden copy in
//! tests/golden/help/ (`KILLSWITCH_BLESS=1` rewrites them after a deliberate change), and
//! every example the help shows parses as a command line.

use std::{path::PathBuf, process::Command};

use testbed::process::killswitch_bin;

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("golden/help")
}

/// `killswitch ARGS --help`, at a fixed width.
fn help(args: &[&str]) -> String {
    let out = Command::new(killswitch_bin())
        .args(args)
        .arg("--help")
        .env("COLUMNS", "100")
        .env_remove("NO_COLOR")
        .output()
        .expect("killswitch runs");
    assert!(out.status.success(), "{args:?} --help failed");
    String::from_utf8(out.stdout).expect("UTF-8 help")
}

/// The top command and every visible subcommand, as argument lists.
fn commands() -> Vec<Vec<String>> {
    let mut all = vec![Vec::new()];
    let top = killswitch::cli::command();
    for sub in top.get_subcommands().filter(|s| !s.is_hide_set()) {
        all.push(vec![sub.get_name().to_owned()]);
        for nested in sub.get_subcommands().filter(|s| !s.is_hide_set()) {
            all.push(vec![
                sub.get_name().to_owned(),
                nested.get_name().to_owned(),
            ]);
        }
    }
    all
}

#[test]
fn help_of_every_command_matches_its_golden_copy() {
    let update = std::env::var_os("KILLSWITCH_BLESS").is_some();
    let mut differ = Vec::new();
    for args in commands() {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let name = if args.is_empty() {
            "killswitch".to_owned()
        } else {
            format!("killswitch-{}", args.join("-"))
        };
        let path = golden_dir().join(format!("{name}.txt"));
        let text = help(&args);
        if update {
            std::fs::create_dir_all(golden_dir()).unwrap();
            std::fs::write(&path, &text).unwrap();
            continue;
        }
        let golden = std::fs::read_to_string(&path).unwrap_or_default();
        if golden != text {
            differ.push(format!("{name}:\n{text}"));
        }
    }
    assert!(
        differ.is_empty(),
        "help changed (KILLSWITCH_BLESS=1 rewrites tests/golden/help/):\n{}",
        differ.join("\n")
    );
}

#[test]
fn every_command_shows_examples_that_parse() {
    for args in commands() {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let text = help(&args);
        let examples: Vec<&str> = text
            .lines()
            .skip_while(|l| *l != "Examples:")
            .skip(1)
            .filter_map(|l| l.trim_start().strip_prefix("killswitch "))
            .collect();
        // The `servers` verbs share their parent's examples.
        if args.len() < 2 {
            assert!(
                !examples.is_empty(),
                "`killswitch {args:?} --help` has no example"
            );
        }
        for example in examples {
            // The command ends where its description (two spaces), a pipe or a redirect starts.
            let command = example
                .split("  ")
                .next()
                .unwrap()
                .split(['|', '>'])
                .next()
                .unwrap();
            let mut words = vec!["killswitch"];
            words.extend(command.split_whitespace().map(|w| w.trim_matches('\'')));
            killswitch::cli::command()
                .try_get_matches_from(&words)
                .unwrap_or_else(|e| panic!("the example `{example}` does not parse: {e}"));
        }
    }
}
