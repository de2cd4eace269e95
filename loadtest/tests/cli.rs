//! The load tools' command lines, as a user (and `loadtest/crash.sh`) runs
//! them. Being integration tests, they also make cargo build the plain
//! binaries with the test build's features, so that `make test` reuses
//! them for the crash test instead of building everything a second time.

use std::process::Command;

fn help(exe: &str) -> String {
    let out = Command::new(exe).arg("--help").output().expect("the binary runs");
    assert!(out.status.success(), "{exe} --help failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("help is UTF-8")
}

#[test]
fn loadtest_explains_its_options() {
    let text = help(env!("CARGO_BIN_EXE_loadtest"));
    for option in ["--rate", "--duration", "--transport", "--acked-file"] {
        assert!(text.contains(option), "loadtest --help lacks {option}:\n{text}");
    }
}

#[test]
fn clusterd_eval_lists_its_commands() {
    let text = help(env!("CARGO_BIN_EXE_clusterd-eval"));
    for command in ["simulate", "compare", "offline", "api"] {
        assert!(text.contains(command), "clusterd-eval --help lacks {command}:\n{text}");
    }
}

#[test]
fn a_bad_option_is_refused_with_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_loadtest")).arg("--no-such-option").output().expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--no-such-option"));
}
