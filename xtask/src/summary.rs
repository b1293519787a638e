//! The summary `cargo xtask test` prints after `cargo test --no-fail-fast`: one line per test
//! binary (suite), then what failed, then the totals.
//!
//! [`Summary::parse`] reads the merged stdout and stderr of cargo, line by line: cargo's
//! `Running <path> (<binary>)` and `Doc-tests <crate>` lines start a suite; libtest's `test result:
//! ok|FAILED. N passed; M failed; K ignored; ...` ends it, its `failures:` section holds the output
//! of each failed test (`---- name stdout ----` blocks) and then their names. A binary that stops
//! without a `test result:` line (an abort, a signal) is named by cargo's `error: test failed, to
//! rerun pass ...` and `process didn't exit successfully: ... (signal: 6, ...)` lines after it.
//! Suites are named after cargo's lines: `tests/outbound.rs`, `unittests src/lib.rs (mesh_agent)`
//! (the crate name from the binary's file name), `Doc-tests mesh_common`. The last line is the
//! totals, `summary: N passed, M failed[, K skipped]` (skipped: ignored tests), where a failed
//! binary counts at least one failure, so a crash is never left out.
//!
//! Parsing is pure; the tests below use output of cargo 1.95 and its libtest.
use std::collections::VecDeque;
use std::fmt::Write as _;

/// How many lines of a failed test's output, or of a crashed binary's last output, are shown.
const SHOWN_LINES: usize = 15;

/// libtest's `test result:` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub ok: bool,
    pub passed: usize,
    pub failed: usize,
    pub ignored: usize,
}

/// One test binary, or the doc-tests of one crate.
#[derive(Debug, Default)]
pub struct Suite {
    pub name: String,
    pub result: Option<Counts>,
    /// `running N tests`.
    pub planned: Option<usize>,
    /// `test name ... ok|ignored` lines, for a binary that printed no result line.
    reported_passed: usize,
    reported_ignored: usize,
    /// Failed tests in the order libtest named them (`test name ... FAILED` or the `failures:`
    /// list).
    pub failed_tests: Vec<String>,
    /// The `---- name stdout ----` blocks, each without its leading and trailing blank lines.
    pub failure_output: Vec<(String, Vec<String>)>,
    /// cargo said this binary failed (`error: test failed, to rerun pass ...`).
    pub cargo_failed: bool,
    /// Why it failed, from cargo's `process didn't exit successfully: ... (why)`.
    pub exit: Option<String>,
    /// The last lines the binary printed.
    pub tail: VecDeque<String>,
}

/// What a suite came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// Passed, but printed no libtest result line (a `harness = false` test).
    OkWithoutResult,
    Failed,
    /// Stopped without a result line and cargo (or its exit status) says it failed.
    Crashed,
}

#[derive(Debug, Default)]
pub struct Summary {
    pub suites: Vec<Suite>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    /// Test lines, before any `failures:`.
    Tests,
    /// After the first `failures:`: `---- name stdout ----` blocks.
    Output,
    /// After the second `failures:`: the failed tests' names, indented.
    Names,
}

impl Summary {
    pub fn parse<S: AsRef<str>>(lines: impl IntoIterator<Item = S>) -> Summary {
        let mut suites: Vec<Suite> = Vec::new();
        // The suite lines belong to; none before the first and after cargo's closing error.
        let mut current: Option<usize> = None;
        let mut section = Section::Tests;
        // Between cargo's `error: test failed` for the current suite and the next suite.
        let mut after_error = false;
        for raw in lines {
            let line = strip_ansi(raw.as_ref());
            let line = line.trim_end();
            if let Some(name) = suite_start(line) {
                suites.push(Suite {
                    name,
                    ..Suite::default()
                });
                current = Some(suites.len() - 1);
                section = Section::Tests;
                after_error = false;
                continue;
            }
            // (`cargo test -q` may print it after its progress dots, on the same line.)
            let unprefixed = line.trim_start_matches(['.', 'i', 'F']);
            if unprefixed.starts_with("error: test failed, to rerun pass ")
                || unprefixed.starts_with("error: doctest failed, to rerun pass ")
            {
                if let Some(i) = current {
                    suites[i].cargo_failed = true;
                }
                after_error = true;
                continue;
            }
            if line.starts_with("error: ") && line.contains(" target") && line.ends_with("failed:")
            {
                // `error: 3 targets failed:` closes the run.
                current = None;
                continue;
            }
            // `cargo test -q` prints no `Running` lines: a `running N tests` outside a suite (or
            // after a finished or failed one) starts an unnamed one.
            if let Some(n) = planned(line) {
                let fresh = after_error || current.is_none_or(|i| suites[i].result.is_some());
                // Inside a failed test's output, a `running N tests` is that test's own child
                // run (a test that re-executes its binary), not ours.
                if !fresh && section == Section::Output {
                    if let Some(i) = current {
                        if let Some((_, block)) = suites[i].failure_output.last_mut() {
                            block.push(line.to_string());
                        }
                    }
                    continue;
                }
                if fresh {
                    suites.push(Suite {
                        name: format!("test binary #{}", suites.len() + 1),
                        ..Suite::default()
                    });
                    current = Some(suites.len() - 1);
                    section = Section::Tests;
                    after_error = false;
                }
                if let Some(i) = current {
                    suites[i].planned = Some(n);
                }
            }
            if after_error {
                if let (Some(i), Some(why)) = (current, exit_reason(line)) {
                    suites[i].exit = Some(why);
                }
                continue;
            }
            let Some(i) = current else { continue };
            let suite = &mut suites[i];
            if suite.result.is_some() {
                // Whatever a finished binary's suite is followed by (doc-tests' timing line).
                continue;
            }
            suite.tail.push_back(line.to_string());
            if suite.tail.len() > SHOWN_LINES {
                suite.tail.pop_front();
            }
            // In a failed test's output, `test result:`, `failures:` and `---- name ----` lines
            // may be a child test run's (a test that re-executes its binary prints the child's
            // output): only ours end a section, and ours name tests this suite saw fail.
            if let Some(counts) = line.strip_prefix("test result: ").and_then(parse_counts) {
                if section != Section::Output {
                    suite.result = Some(counts);
                    section = Section::Tests;
                    continue;
                }
            }
            if line == "failures:" {
                section = match section {
                    Section::Tests => Section::Output,
                    Section::Output | Section::Names => Section::Names,
                };
                continue;
            }
            if section == Section::Names
                && !line.trim().is_empty()
                && !line
                    .strip_prefix("    ")
                    .is_some_and(|n| suite.failed_tests.iter().any(|f| f == n.trim()))
            {
                // Not a list of our failed tests: that `failures:` was part of the output.
                section = Section::Output;
                if let Some((_, block)) = suite.failure_output.last_mut() {
                    block.push("failures:".to_string());
                }
            }
            match section {
                Section::Tests => {
                    if let Some((name, outcome)) = test_line(line) {
                        match outcome {
                            "ok" => suite.reported_passed += 1,
                            "FAILED" => push_unique(&mut suite.failed_tests, name),
                            o if o.starts_with("ignored") => suite.reported_ignored += 1,
                            _ => {}
                        }
                    }
                }
                Section::Output => {
                    let ours = block_start(line)
                        .filter(|name| suite.failed_tests.iter().any(|f| f == name));
                    if let Some(name) = ours {
                        suite.failure_output.push((name.to_string(), Vec::new()));
                    } else if let Some((_, block)) = suite.failure_output.last_mut() {
                        block.push(line.to_string());
                    }
                }
                Section::Names => {
                    if let Some(name) = line.strip_prefix("    ") {
                        push_unique(&mut suite.failed_tests, name.trim());
                    }
                }
            }
        }
        for suite in &mut suites {
            for (_, block) in &mut suite.failure_output {
                while block.last().is_some_and(|l| l.trim().is_empty()) {
                    block.pop();
                }
                let blank = block.iter().take_while(|l| l.trim().is_empty()).count();
                block.drain(..blank);
            }
        }
        Summary { suites }
    }

    /// Each suite's verdict. `cargo_ok` is whether cargo exited successfully: if it did not and
    /// no suite is known to have failed, the last suite without a result line is the culprit
    /// (its output was cut off).
    pub fn verdicts(&self, cargo_ok: bool) -> Vec<Verdict> {
        let mut verdicts: Vec<Verdict> = self
            .suites
            .iter()
            .map(|s| match s.result {
                Some(c) if c.ok && !s.cargo_failed => Verdict::Ok,
                Some(_) => Verdict::Failed,
                None if s.cargo_failed => Verdict::Crashed,
                None => Verdict::OkWithoutResult,
            })
            .collect();
        let any_failed = verdicts
            .iter()
            .any(|v| matches!(v, Verdict::Failed | Verdict::Crashed));
        if !cargo_ok && !any_failed {
            if let Some(last) = verdicts.last_mut() {
                if *last == Verdict::OkWithoutResult {
                    *last = Verdict::Crashed;
                }
            }
        }
        verdicts
    }

    /// The names of the suites that failed.
    pub fn failed(&self, cargo_ok: bool) -> Vec<&str> {
        self.suites
            .iter()
            .zip(self.verdicts(cargo_ok))
            .filter(|(_, v)| matches!(v, Verdict::Failed | Verdict::Crashed))
            .map(|(s, _)| s.name.as_str())
            .collect()
    }

    /// (passed, failed, skipped) over every suite. A suite that failed counts at least one
    /// failure, so a crashed binary is never left out of the failed count.
    pub fn totals(&self, cargo_ok: bool) -> (usize, usize, usize) {
        let mut totals = (0, 0, 0);
        for (suite, verdict) in self.suites.iter().zip(self.verdicts(cargo_ok)) {
            let (passed, failed, ignored) = match suite.result {
                Some(c) => (c.passed, c.failed, c.ignored),
                None => (
                    suite.reported_passed,
                    suite.failed_tests.len(),
                    suite.reported_ignored,
                ),
            };
            let failed = match verdict {
                Verdict::Failed | Verdict::Crashed => failed.max(1),
                Verdict::Ok | Verdict::OkWithoutResult => failed,
            };
            totals.0 += passed;
            totals.1 += failed;
            totals.2 += ignored;
        }
        totals
    }

    /// The summary as printed: a line per suite, the failures, and last the totals line
    /// `summary: N passed, M failed[, K skipped]`.
    pub fn render(&self, cargo_ok: bool) -> String {
        let verdicts = self.verdicts(cargo_ok);
        let mut out = String::from("\ntest summary:\n");
        if self.suites.is_empty() {
            out.push_str("  no test binary ran");
            if !cargo_ok {
                out.push_str(" (cargo failed before running any: see its errors above)");
            }
            out.push('\n');
        }
        let width = self.suites.iter().map(|s| s.name.len()).max().unwrap_or(0);
        for (suite, verdict) in self.suites.iter().zip(&verdicts) {
            let (word, what) = match (verdict, suite.result) {
                (Verdict::Ok | Verdict::Failed, Some(c)) => (
                    if *verdict == Verdict::Ok {
                        "ok"
                    } else {
                        "FAILED"
                    },
                    counts_text(c)
                        + if c.ok && suite.cargo_failed {
                            "; but the binary failed after its result line"
                        } else {
                            ""
                        },
                ),
                (Verdict::OkWithoutResult, _) => ("ok", "no libtest result line".to_string()),
                _ => ("FAILED", crash_text(suite)),
            };
            let _ = writeln!(out, "  {word:<6}  {:<width$}  {what}", suite.name);
        }
        let failed: Vec<_> = self
            .suites
            .iter()
            .zip(&verdicts)
            .filter(|(_, v)| matches!(v, Verdict::Failed | Verdict::Crashed))
            .collect();
        for (suite, verdict) in failed {
            let _ = writeln!(out, "\nFAILED {}:", suite.name);
            if *verdict == Verdict::Crashed || suite.result.is_some_and(|c| c.ok) {
                let _ = writeln!(out, "  {}; the last lines it printed:", crash_text(suite));
                let tail = suite.tail.iter().skip_while(|l| l.trim().is_empty());
                for line in tail {
                    quote(&mut out, line);
                }
            }
            for name in &suite.failed_tests {
                let _ = writeln!(out, "  {name}");
                let block = suite
                    .failure_output
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, b)| b.as_slice())
                    .unwrap_or_default();
                for line in block.iter().take(SHOWN_LINES) {
                    quote(&mut out, line);
                }
                if block.len() > SHOWN_LINES {
                    let _ = writeln!(
                        out,
                        "    | ... {} more lines (in the output above)",
                        block.len() - SHOWN_LINES
                    );
                }
            }
        }
        let (passed, failed, skipped) = self.totals(cargo_ok);
        let _ = write!(out, "\nsummary: {passed} passed, {failed} failed");
        if skipped > 0 {
            let _ = write!(out, ", {skipped} skipped");
        }
        out.push('\n');
        out
    }
}

/// A line of a test's output, set off from ours.
fn quote(out: &mut String, line: &str) {
    out.push_str("    |");
    if !line.is_empty() {
        out.push(' ');
        out.push_str(line);
    }
    out.push('\n');
}

fn counts_text(c: Counts) -> String {
    let mut text = format!("{} passed, {} failed", c.passed, c.failed);
    if c.ignored > 0 {
        let _ = write!(text, ", {} ignored", c.ignored);
    }
    text
}

fn crash_text(suite: &Suite) -> String {
    let mut text = String::from("no result line (crashed?)");
    if suite.result.is_some() {
        text = String::from("the binary failed after its result line");
    }
    match (suite.planned, suite.result) {
        (Some(planned), None) => {
            let _ = write!(
                text,
                ": {} of {planned} tests reported",
                suite.reported_passed + suite.reported_ignored + suite.failed_tests.len()
            );
        }
        (None, None) => text.push_str(": it never started its tests"),
        _ => {}
    }
    if let Some(exit) = &suite.exit {
        let _ = write!(text, "; {exit}");
    }
    text
}

fn push_unique(names: &mut Vec<String>, name: &str) {
    if !names.iter().any(|n| n == name) {
        names.push(name.to_string());
    }
}

/// The suite a cargo status line starts, by name: `Running tests/outbound.rs
/// (target/debug/deps/outbound-0123abcd)` is `tests/outbound.rs`, `Running unittests src/lib.rs
/// (target/debug/deps/mesh_agent-0123abcd)` is `unittests src/lib.rs (mesh_agent)`, and
/// `Doc-tests mesh_common` is `Doc-tests mesh_common`.
fn suite_start(line: &str) -> Option<String> {
    // cargo right-aligns its status words: the line starts with spaces or the word itself.
    let rest = line.trim_start();
    if let Some(krate) = rest.strip_prefix("Doc-tests ") {
        return (!krate.contains(' ')).then(|| format!("Doc-tests {krate}"));
    }
    let rest = rest.strip_prefix("Running ")?;
    let (path, binary) = rest.strip_suffix(')')?.rsplit_once(" (")?;
    if path.starts_with("unittests ") {
        let file = binary.rsplit('/').next().unwrap_or(binary);
        let krate = match file.rsplit_once('-') {
            Some((krate, hash)) if hash.bytes().all(|b| b.is_ascii_hexdigit()) => krate,
            _ => file,
        };
        Some(format!("{path} ({krate})"))
    } else {
        Some(path.to_string())
    }
}

/// `running 3 tests` (or `running 1 test`).
fn planned(line: &str) -> Option<usize> {
    let rest = line.strip_prefix("running ")?;
    let n = rest
        .strip_suffix(" tests")
        .or_else(|| rest.strip_suffix(" test"))?;
    n.parse().ok()
}

/// `test name ... ok` as (name, outcome); also cargo test -q's `name --- FAILED`.
fn test_line(line: &str) -> Option<(&str, &str)> {
    if let Some(rest) = line.strip_prefix("test ") {
        if let Some(found) = rest.rsplit_once(" ... ") {
            return Some(found);
        }
    }
    let (name, outcome) = line.rsplit_once(" --- ")?;
    (outcome == "FAILED" && !name.contains(' ')).then_some((name, outcome))
}

/// `---- name stdout ----`.
fn block_start(line: &str) -> Option<&str> {
    let inner = line.strip_prefix("---- ")?.strip_suffix(" ----")?;
    inner
        .strip_suffix(" stdout")
        .or_else(|| inner.strip_suffix(" stderr"))
}

/// `ok. 2 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.00s`.
fn parse_counts(rest: &str) -> Option<Counts> {
    let (status, fields) = rest.split_once(". ")?;
    let ok = match status {
        "ok" => true,
        "FAILED" => false,
        _ => return None,
    };
    let mut counts = Counts {
        ok,
        passed: 0,
        failed: 0,
        ignored: 0,
    };
    let mut seen = false;
    for field in fields.split("; ") {
        let Some((n, what)) = field.split_once(' ') else {
            continue;
        };
        let Ok(n) = n.parse() else { continue };
        match what {
            "passed" => counts.passed = n,
            "failed" => counts.failed = n,
            "ignored" => counts.ignored = n,
            _ => continue,
        }
        seen = true;
    }
    seen.then_some(counts)
}

/// cargo's `  process didn't exit successfully: `path` (signal: 6, SIGABRT: process abort
/// signal)`: the part in parentheses, or the whole message.
fn exit_reason(line: &str) -> Option<String> {
    let message = line
        .trim()
        .strip_prefix("process didn't exit successfully: ")?;
    Some(
        message
            .rsplit_once("` (")
            .and_then(|(_, why)| why.strip_suffix(')'))
            .unwrap_or(message)
            .to_string(),
    )
}

/// The line without terminal escape sequences (CARGO_TERM_COLOR=always).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Summary {
        Summary::parse(text.lines())
    }

    fn last_line(rendered: &str) -> &str {
        rendered.lines().last().unwrap()
    }

    /// What `cargo xtask test` prints last must be read as a test count: `N passed, M failed`
    /// (`, K skipped` may follow), alone on a line with at most one `word:` before it.
    fn assert_total_line(line: &str) {
        let rest = line.strip_prefix("summary: ").unwrap();
        let parts: Vec<&str> = rest.split(", ").collect();
        assert!((2..=3).contains(&parts.len()), "{line}");
        for (part, word) in parts.iter().zip(["passed", "failed", "skipped"]) {
            let (n, w) = part.split_once(' ').unwrap();
            assert!(n.parse::<usize>().is_ok() && w == word, "{line}");
        }
    }

    const ALL_OK: &str = r"   Compiling mesh-common v0.1.0 (/work/main/mesh-common)
   Compiling mesh-agent v0.1.0 (/work/main/mesh-agent)
    Finished `test` profile [unoptimized + debuginfo] target(s) in 41.20s
     Running unittests src/lib.rs (target/debug/deps/mesh_agent-e62994b938fd5803)

running 3 tests
test config::tests::parses ... ok
test state::tests::tracks ... ok
test metrics::tests::names ... ok

test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s

     Running tests/outbound.rs (target/debug/deps/outbound-14a8d93aa4c13546)

running 2 tests
test echo_v4 ... ok
test echo_v6 ... ok

test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 3.12s

   Doc-tests mesh_common

running 0 tests

test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s

";

    #[test]
    fn all_ok() {
        let s = parse(ALL_OK);
        let names: Vec<_> = s.suites.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "unittests src/lib.rs (mesh_agent)",
                "tests/outbound.rs",
                "Doc-tests mesh_common"
            ]
        );
        assert_eq!(s.verdicts(true), [Verdict::Ok; 3]);
        assert!(s.failed(true).is_empty());
        assert_eq!(s.totals(true), (5, 0, 0));
        let rendered = s.render(true);
        assert!(
            rendered.contains("  ok      tests/outbound.rs                  2 passed, 0 failed\n")
        );
        assert!(!rendered.contains("FAILED"));
        assert_eq!(last_line(&rendered), "summary: 5 passed, 0 failed");
        assert_total_line(last_line(&rendered));
    }

    const ONE_FAILED: &str = r#"     Running unittests src/lib.rs (target/debug/deps/alpha-e62994b938fd5803)

running 4 tests
test tests::adds ... ok
test tests::errs ... FAILED
test tests::slow ... ignored, slow
test tests::adds_wrong ... FAILED

failures:

---- tests::errs stdout ----
Error: "bad thing"

---- tests::adds_wrong stdout ----
some captured stdout

thread 'tests::adds_wrong' (7258) panicked at alpha/src/lib.rs:19:9:
assertion `left == right` failed: one and two
  left: 3
 right: 4
stack backtrace:
   0: __rustc::rust_begin_unwind
             at /rustc/59807616e1fa2540724bfbac14d7976d7e4a3860/library/std/src/panicking.rs:689:5
   1: core::panicking::panic_fmt
             at /rustc/59807616e1fa2540724bfbac14d7976d7e4a3860/library/core/src/panicking.rs:80:14
   2: core::panicking::assert_failed_inner
             at /rustc/59807616e1fa2540724bfbac14d7976d7e4a3860/library/core/src/panicking.rs:434:23
   3: core::panicking::assert_failed::<u32, u32>
             at /rustc/59807616e1fa2540724bfbac14d7976d7e4a3860/library/core/src/panicking.rs:394:5
   4: alpha::tests::adds_wrong
             at ./src/lib.rs:19:9
   5: alpha::tests::adds_wrong::{{closure}}
             at ./src/lib.rs:17:20
note: Some details are omitted, run with `RUST_BACKTRACE=full` for a verbose backtrace.


failures:
    tests::adds_wrong
    tests::errs

test result: FAILED. 1 passed; 2 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.10s

error: test failed, to rerun pass `-p alpha --lib`
     Running tests/outbound.rs (target/debug/deps/outbound-14a8d93aa4c13546)

running 3 tests
test fine2 ... ok
test later ... ignored
test fine ... ok

test result: ok. 2 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.00s

error: 1 target failed:
    `-p alpha --lib`
"#;

    /// A failed test whose output holds a whole child test run (a test that re-executes its
    /// own binary and prints what the child said).
    const NESTED: &str = r#"     Running unittests src/lib.rs (target/debug/deps/mesh_agent-01d20bc2b6a1ce24)

running 3 tests
test a ... ok
test parent ... FAILED
test z ... ok

failures:

---- parent stdout ----

running 1 test
test parent_child ... FAILED

failures:

---- parent_child stdout ----
child panicked

failures:
    parent_child

test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 5 filtered out; finished in 0.01s

thread 'parent' panicked at src/lib.rs:9:5:
child failed

failures:
    parent

test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.30s

error: test failed, to rerun pass `-p mesh-agent --lib`
"#;

    #[test]
    fn a_child_test_run_inside_a_failure_is_output_not_a_result() {
        let s = parse(NESTED);
        assert_eq!(s.suites.len(), 1);
        let suite = &s.suites[0];
        assert_eq!(suite.failed_tests, ["parent"]);
        assert_eq!(suite.failure_output.len(), 1, "{:#?}", suite.failure_output);
        let (name, block) = &suite.failure_output[0];
        assert_eq!(name, "parent");
        assert!(block.iter().any(|l| l == "child panicked"), "{block:#?}");
        assert_eq!(block.last().map(String::as_str), Some("child failed"));
        assert_eq!(s.totals(false), (2, 1, 0));
    }

    #[test]
    fn one_failed_test_with_a_panic() {
        let s = parse(ONE_FAILED);
        assert_eq!(s.verdicts(false), [Verdict::Failed, Verdict::Ok]);
        assert_eq!(s.failed(false), ["unittests src/lib.rs (alpha)"]);
        let suite = &s.suites[0];
        assert_eq!(suite.failed_tests, ["tests::errs", "tests::adds_wrong"]);
        assert_eq!(
            suite.failure_output[0],
            (
                "tests::errs".to_string(),
                vec![r#"Error: "bad thing""#.to_string()]
            )
        );
        let (name, block) = &suite.failure_output[1];
        assert_eq!(name, "tests::adds_wrong");
        assert_eq!(block[0], "some captured stdout");
        assert!(block.last().unwrap().starts_with("note: Some details"));
        assert_eq!(s.totals(false), (3, 2, 2));

        let rendered = s.render(false);
        assert!(rendered
            .contains("  FAILED  unittests src/lib.rs (alpha)  1 passed, 2 failed, 1 ignored\n"));
        assert!(rendered
            .contains("  ok      tests/outbound.rs             2 passed, 0 failed, 1 ignored\n"));
        let failures = &rendered[rendered.find("\nFAILED ").unwrap()..];
        assert!(failures.starts_with("\nFAILED unittests src/lib.rs (alpha):\n  tests::errs\n    | Error: \"bad thing\"\n  tests::adds_wrong\n    | some captured stdout\n"));
        assert!(failures.contains("    | thread 'tests::adds_wrong' (7258) panicked at alpha/src/lib.rs:19:9:\n    | assertion `left == right` failed: one and two\n"));
        // The first 15 lines of a long failure, and a note of how many more there are.
        assert!(failures.contains("    | ... 5 more lines (in the output above)\n"));
        assert!(!failures.contains("closure"));
        assert_eq!(
            last_line(&rendered),
            "summary: 3 passed, 2 failed, 2 skipped"
        );
        assert_total_line(last_line(&rendered));
    }

    const CRASHED: &str = r"     Running unittests src/lib.rs (target/debug/deps/beta_crate-e7ec768d5ad5036a)

running 1 test
test tests::it_works ... ok

test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s

     Running tests/crash.rs (target/debug/deps/crash-13af6d3b83cafab1)

running 2 tests
test before ... ok
error: test failed, to rerun pass `-p beta-crate --test crash`

Caused by:
  process didn't exit successfully: `/tmp/sumprobe/target/debug/deps/crash-13af6d3b83cafab1` (signal: 6, SIGABRT: process abort signal)
     Running tests/plain.rs (target/debug/deps/plain-800a8350dbb0bb61)
plain harness-less test ran
error: 1 target failed:
    `-p beta-crate --test crash`
";

    #[test]
    fn a_crashed_binary() {
        let s = parse(CRASHED);
        let names: Vec<_> = s.suites.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "unittests src/lib.rs (beta_crate)",
                "tests/crash.rs",
                "tests/plain.rs"
            ]
        );
        // The harness-less binary after it passed: cargo named only the crashed one.
        assert_eq!(
            s.verdicts(false),
            [Verdict::Ok, Verdict::Crashed, Verdict::OkWithoutResult]
        );
        assert_eq!(
            s.suites[1].exit.as_deref(),
            Some("signal: 6, SIGABRT: process abort signal")
        );
        // The crash counts as one failure; the test it finished counts as passed.
        assert_eq!(s.totals(false), (2, 1, 0));
        let rendered = s.render(false);
        assert!(rendered.contains(
            "  FAILED  tests/crash.rs                     no result line (crashed?): 1 of 2 tests \
             reported; signal: 6, SIGABRT: process abort signal\n"
        ));
        assert!(rendered
            .contains("  ok      tests/plain.rs                     no libtest result line\n"));
        assert!(rendered.contains(
            "\nFAILED tests/crash.rs:\n  no result line (crashed?): 1 of 2 tests reported; signal: 6, \
             SIGABRT: process abort signal; the last lines it printed:\n    | running 2 \
             tests\n    | test before ... ok\n\n"
        ));
        assert_eq!(last_line(&rendered), "summary: 2 passed, 1 failed");
    }

    #[test]
    fn output_cut_off_without_cargo_naming_a_binary() {
        // cargo itself was killed while the last binary ran.
        let text = "     Running tests/hbone.rs (target/debug/deps/hbone-0123456789abcdef)\n\nrunning 5 tests\ntest a ... ok\n";
        let s = parse(text);
        assert_eq!(s.verdicts(true), [Verdict::OkWithoutResult]);
        assert_eq!(s.verdicts(false), [Verdict::Crashed]);
        assert_eq!(s.totals(false), (1, 1, 0));
        assert!(s
            .render(false)
            .contains("no result line (crashed?): 1 of 5 tests reported"));
    }

    const IGNORED: &str = r"     Running tests/topology.rs (target/debug/deps/topology-0f1e2d3c4b5a6978)

running 4 tests
test builds_two_nodes ... ok
test ipv6_only ... ignored, needs a kernel with seg6
test slow_soak ... ignored
test tears_down ... ok

test result: ok. 2 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 1.53s

";

    #[test]
    fn ignored_tests_are_skipped() {
        let s = parse(IGNORED);
        assert_eq!(s.verdicts(true), [Verdict::Ok]);
        assert_eq!(s.totals(true), (2, 0, 2));
        let rendered = s.render(true);
        assert!(rendered.contains("  ok      tests/topology.rs  2 passed, 0 failed, 2 ignored\n"));
        assert_eq!(
            last_line(&rendered),
            "summary: 2 passed, 0 failed, 2 skipped"
        );
        assert_total_line(last_line(&rendered));
    }

    const DOC_TESTS: &str = r"   Doc-tests alpha

running 2 tests
test alpha/src/lib.rs - add (line 3) ... ok
test alpha/src/lib.rs - add (line 7) ... FAILED

failures:

---- alpha/src/lib.rs - add (line 7) stdout ----
Test executable failed (exit status: 101).

stderr:

thread 'main' (7299) panicked at /tmp/rustdoctest90JXyh/doctest_bundle_2024.rs:14:1:
assertion `left == right` failed
  left: 3
 right: 4
note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace



failures:
    alpha/src/lib.rs - add (line 7)

test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.09s

all doctests ran in 0.55s; merged doctests compilation took 0.45s
error: doctest failed, to rerun pass `-p alpha --doc`
   Doc-tests beta_crate

running 0 tests

test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s

error: 1 target failed:
    `-p alpha --doc`
";

    #[test]
    fn doc_tests() {
        let s = parse(DOC_TESTS);
        let names: Vec<_> = s.suites.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["Doc-tests alpha", "Doc-tests beta_crate"]);
        assert_eq!(s.verdicts(false), [Verdict::Failed, Verdict::Ok]);
        assert_eq!(
            s.suites[0].failed_tests,
            ["alpha/src/lib.rs - add (line 7)"]
        );
        let (name, block) = &s.suites[0].failure_output[0];
        assert_eq!(name, "alpha/src/lib.rs - add (line 7)");
        assert_eq!(
            block.first().unwrap(),
            "Test executable failed (exit status: 101)."
        );
        assert!(block.last().unwrap().starts_with("note: run with"));
        let rendered = s.render(false);
        assert!(rendered.contains("\nFAILED Doc-tests alpha:\n  alpha/src/lib.rs - add (line 7)\n    | Test executable failed (exit status: 101).\n"));
        assert_eq!(last_line(&rendered), "summary: 1 passed, 1 failed");
    }

    const COMPILE_ERROR: &str = r#"   Compiling alpha v0.1.0 (/tmp/sumprobe/alpha)
error[E0308]: mismatched types
 --> alpha/tests/outbound.rs:8:22
  |
8 | fn broken() -> u32 { "x" }
  |                ---   ^^^ expected `u32`, found `&str`
  |                |
  |                expected `u32` because of return type

For more information about this error, try `rustc --explain E0308`.
error: could not compile `alpha` (test "outbound") due to 1 previous error
"#;

    #[test]
    fn a_compile_error_runs_no_suite() {
        let s = parse(COMPILE_ERROR);
        assert!(s.suites.is_empty());
        assert!(s.failed(false).is_empty());
        let rendered = s.render(false);
        assert!(rendered.contains("  no test binary ran (cargo failed before running any"));
        assert_eq!(last_line(&rendered), "summary: 0 passed, 0 failed");
    }

    #[test]
    fn quiet_output_and_colors() {
        // `cargo test -q` prints no `Running` lines and terse test lines; colors are dropped.
        let text = "\nrunning 3 tests\n. 1/3\ntests::errs --- FAILED\ni 3/3\n\nfailures:\n\n\
                    ---- tests::errs stdout ----\nError: \"bad thing\"\n\n\nfailures:\n    \
                    tests::errs\n\ntest result: FAILED. 1 passed; 1 failed; 1 ignored; 0 \
                    measured; 0 filtered out; finished in 0.00s\n\n\nrunning 1 test\n.\n\u{1b}[32mtest \
                    result: ok\u{1b}[0m. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered \
                    out; finished in 0.00s\n\n\nrunning 2 tests\n.error: test failed, to rerun \
                    pass `-p beta-crate --test crash`\n\nCaused by:\n  process didn't exit \
                    successfully: `/t/crash-13af6d3b83cafab1` (signal: 6, SIGABRT: process abort \
                    signal)\nplain harness-less test ran\n\nrunning 0 tests\n\ntest result: ok. 0 \
                    passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s\n";
        let s = parse(text);
        let names: Vec<_> = s.suites.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "test binary #1",
                "test binary #2",
                "test binary #3",
                "test binary #4"
            ]
        );
        assert_eq!(
            s.verdicts(false),
            [Verdict::Failed, Verdict::Ok, Verdict::Crashed, Verdict::Ok]
        );
        assert_eq!(s.suites[0].failed_tests, ["tests::errs"]);
        assert_eq!(
            s.suites[2].exit.as_deref(),
            Some("signal: 6, SIGABRT: process abort signal")
        );
        assert_eq!(s.totals(false), (2, 2, 1));
    }

    #[test]
    fn suite_names() {
        assert_eq!(
            suite_start("     Running unittests src/main.rs (target/debug/deps/mesh_agent-0a1b2c3d4e5f6789)"),
            Some("unittests src/main.rs (mesh_agent)".to_string())
        );
        assert_eq!(
            suite_start(
                "     Running tests/outbound.rs (target/debug/deps/outbound-0a1b2c3d4e5f6789)"
            ),
            Some("tests/outbound.rs".to_string())
        );
        assert_eq!(suite_start("Running the agent"), None);
        assert_eq!(suite_start("test result: ok."), None);
    }
}
