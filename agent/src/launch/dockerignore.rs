//! `.dockerignore` semantics, as the Docker CLI applies them when it sends a build context.
//!
//! This module owns parsing the file (the rules of BuildKit's `dockerignore.ReadAll`) and
//! matching context paths against it (the rules of `github.com/moby/patternmatcher`
//! `MatchesOrParentMatches`, plus the directory-skipping rule of the context walker). It is a
//! pure function of text and paths: it must not read files, walk trees or know about Git.
//!
//! Known differences from Docker, all in corners that real files avoid:
//! - a character class `[...]` follows Go's `filepath.Match` (ranges, `^` negation, `\`
//!   escapes); Docker translates the pattern to a regular expression character by character,
//!   which mangles `*` or `?` written inside a class;
//! - `\x` always means the literal `x`; Docker's regular expression gives a few escapes such
//!   as `\d` a class meaning.

use thiserror::Error;

/// The longest line accepted; Docker's line scanner fails on longer lines too. It also
/// bounds the work one pattern can cause.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// A `.dockerignore` that cannot be used; Docker refuses to build with it too.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DockerIgnoreError {
    /// A pattern that Go's `filepath.Match` rejects.
    #[error(".dockerignore line {line}: pattern {pattern:?} is not valid: {reason}")]
    BadPattern {
        line: usize,
        pattern: String,
        reason: &'static str,
    },
    /// A line longer than [`MAX_LINE_BYTES`].
    #[error(".dockerignore line {line} is {len} bytes long, more than the {max} bytes allowed")]
    LineTooLong { line: usize, len: usize, max: usize },
}

/// A parsed `.dockerignore`: patterns in file order, the last matching one deciding.
#[derive(Debug, Clone, Default)]
pub struct DockerIgnore {
    patterns: Vec<Pattern>,
}

#[derive(Debug, Clone)]
struct Pattern {
    /// The cleaned pattern without its `!`.
    text: String,
    /// `!pattern`: a match re-includes the path.
    exception: bool,
    kind: Kind,
}

/// How a pattern matches, mirroring patternmatcher's match types (its fast paths are not
/// all equivalent to its regular expression, e.g. `**foo` matches `barfoo`).
#[derive(Debug, Clone)]
enum Kind {
    Exact,
    /// Text ending in `**` with no other wildcard: the path starts with the rest.
    Prefix(String),
    /// Text starting with `**` with no other wildcard: the path ends with the rest.
    Suffix(String),
    Tokens(Vec<Token>),
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Lit(char),
    /// `?`: one character other than `/`.
    One,
    /// `*`: any run of characters other than `/`.
    Star,
    /// `**` followed by more pattern: `(.*/)?`, any number of leading directories.
    AnyDirs,
    /// `**` at the end of a pattern that has other wildcards: `.*`.
    AnyAll,
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

impl DockerIgnore {
    /// Parses `.dockerignore` text: `#` comment lines, blank lines skipped, surrounding
    /// space trimmed, `!` for exceptions, patterns cleaned like paths and made relative to
    /// the context root (a leading `/` is dropped).
    pub fn parse(text: &str) -> Result<DockerIgnore, DockerIgnoreError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut patterns = Vec::new();
        for (index, raw) in text.split('\n').enumerate() {
            let line = index + 1;
            if raw.len() > MAX_LINE_BYTES {
                return Err(DockerIgnoreError::LineTooLong {
                    line,
                    len: raw.len(),
                    max: MAX_LINE_BYTES,
                });
            }
            let raw = raw.strip_suffix('\r').unwrap_or(raw);
            // Docker looks for comments before trimming: " # x" is a pattern.
            if raw.starts_with('#') {
                continue;
            }
            let trimmed = raw.trim();
            if trimmed.is_empty() {
                continue;
            }
            // BuildKit's reader: clean the pattern and drop a leading slash.
            let (exception, rest) = match trimmed.strip_prefix('!') {
                Some(rest) => (true, rest.trim()),
                None => (false, trimmed),
            };
            let mut body = String::new();
            if !rest.is_empty() {
                body = clean(rest);
                if body.len() > 1
                    && let Some(stripped) = body.strip_prefix('/')
                {
                    body = stripped.to_owned();
                }
            }
            let entry = if exception { format!("!{body}") } else { body };
            // patternmatcher.New: trim and clean again, then split off the `!`.
            let entry = clean(entry.trim());
            let (exception, body) = match entry.strip_prefix('!') {
                Some("") => {
                    return Err(DockerIgnoreError::BadPattern {
                        line,
                        pattern: raw.to_owned(),
                        reason: "an exception needs a pattern after `!`",
                    });
                }
                Some(body) => (true, body.to_owned()),
                None => (false, entry),
            };
            let kind = compile(&body).map_err(|reason| DockerIgnoreError::BadPattern {
                line,
                pattern: raw.to_owned(),
                reason,
            })?;
            patterns.push(Pattern {
                text: body,
                exception,
                kind,
            });
        }
        Ok(DockerIgnore { patterns })
    }

    /// Appends an exception for exactly `path` (no wildcards), as the Docker CLI does for the
    /// Dockerfile and `.dockerignore` so that they always reach the builder.
    pub fn keep(&mut self, path: &str) {
        let text = clean(path.trim_start_matches('/'));
        self.patterns.push(Pattern {
            kind: Kind::Exact,
            text,
            exception: true,
        });
    }

    /// Whether any pattern is an exception (`!…`).
    pub fn has_exceptions(&self) -> bool {
        self.patterns.iter().any(|p| p.exception)
    }

    /// Whether the context path `path` (relative to the context root, `/`-separated) is left
    /// out of the context: the last pattern that matches the path or one of its parent
    /// directories decides. Docker patterns do not tell files from directories (`dir/` is
    /// cleaned to `dir` and also matches a file named `dir`), so `is_dir` does not change the
    /// answer; it is taken so callers state what they ask about.
    pub fn is_excluded(&self, path: &str, is_dir: bool) -> bool {
        let _ = is_dir;
        let path = clean(path.trim_start_matches('/'));
        if path == "." {
            // Docker: "don't let them exclude everything".
            return false;
        }
        let parents: Vec<&str> = path.match_indices('/').map(|(at, _)| &path[..at]).collect();
        let mut excluded = false;
        for pattern in &self.patterns {
            // An exclusion only matters while the path is included and an exception only
            // while it is excluded.
            if pattern.exception != excluded {
                continue;
            }
            let hit = pattern.matches(&path) || parents.iter().any(|dir| pattern.matches(dir));
            if hit {
                excluded = !pattern.exception;
            }
        }
        excluded
    }

    /// Whether a walker may skip the whole directory `dir`: it is excluded and no exception
    /// pattern names a path below it. This is Docker's context walker rule, so an exception
    /// such as `!**/keep` does not reach into an excluded directory, exactly as with Docker.
    pub fn skip_dir(&self, dir: &str) -> bool {
        if !self.is_excluded(dir, true) {
            return false;
        }
        let dir_slash = format!("{}/", clean(dir.trim_start_matches('/')));
        !self
            .patterns
            .iter()
            .any(|p| p.exception && format!("{}/", p.text).starts_with(&dir_slash))
    }
}

impl Pattern {
    fn matches(&self, path: &str) -> bool {
        match &self.kind {
            Kind::Exact => path == self.text,
            Kind::Prefix(prefix) => path.starts_with(prefix.as_str()),
            Kind::Suffix(suffix) => {
                path.ends_with(suffix.as_str())
                    || suffix.strip_prefix('/').is_some_and(|rest| path == rest)
            }
            Kind::Tokens(tokens) => match_tokens(tokens, path),
        }
    }
}

/// Go's `filepath.Clean` for `/`-separated paths.
fn clean(path: &str) -> String {
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|last| *last != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            other => parts.push(other),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_owned(),
        (false, false) => joined,
    }
}

/// Turns a cleaned pattern into a matcher the way patternmatcher's `compile` does, and
/// rejects what `filepath.Match` rejects.
fn compile(text: &str) -> Result<Kind, &'static str> {
    #[derive(PartialEq)]
    enum Detected {
        Exact,
        Prefix,
        Suffix,
        Regex,
    }
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut detected = Detected::Exact;
    let mut at = 0;
    let mut first = true;
    while let Some(&ch) = chars.get(at) {
        at += 1;
        match ch {
            '*' if chars.get(at) == Some(&'*') => {
                at += 1;
                if chars.get(at) == Some(&'/') {
                    at += 1;
                }
                if at >= chars.len() {
                    if detected == Detected::Exact {
                        detected = Detected::Prefix;
                    } else {
                        tokens.push(Token::AnyAll);
                        detected = Detected::Regex;
                    }
                } else {
                    tokens.push(Token::AnyDirs);
                    detected = Detected::Regex;
                }
                if first {
                    detected = Detected::Suffix;
                }
            }
            '*' => {
                tokens.push(Token::Star);
                detected = Detected::Regex;
            }
            '?' => {
                tokens.push(Token::One);
                detected = Detected::Regex;
            }
            '\\' => {
                let Some(&next) = chars.get(at) else {
                    return Err("it ends with an unfinished `\\` escape");
                };
                at += 1;
                tokens.push(Token::Lit(next));
                detected = Detected::Regex;
            }
            '[' => {
                let (class, next) = parse_class(&chars, at)?;
                tokens.push(class);
                at = next;
                detected = Detected::Regex;
            }
            other => tokens.push(Token::Lit(other)),
        }
        first = false;
    }
    Ok(match detected {
        Detected::Exact => Kind::Exact,
        Detected::Prefix => Kind::Prefix(text.strip_suffix("**").unwrap_or(text).to_owned()),
        Detected::Suffix => Kind::Suffix(text.strip_prefix("**").unwrap_or(text).to_owned()),
        Detected::Regex => Kind::Tokens(tokens),
    })
}

/// Parses a character class whose `[` is just before `at`; returns it and the index after
/// its `]`.
fn parse_class(chars: &[char], mut at: usize) -> Result<(Token, usize), &'static str> {
    const UNCLOSED: &str = "a `[` character class is not closed";
    let negated = chars.get(at) == Some(&'^');
    if negated {
        at += 1;
    }
    let mut ranges = Vec::new();
    loop {
        match chars.get(at) {
            None => return Err(UNCLOSED),
            Some(']') if !ranges.is_empty() => {
                return Ok((Token::Class { negated, ranges }, at + 1));
            }
            Some(_) => {}
        }
        let (lo, next) = class_char(chars, at)?;
        at = next;
        let mut hi = lo;
        if chars.get(at) == Some(&'-') {
            let (end, next) = class_char(chars, at + 1)?;
            hi = end;
            at = next;
        }
        if lo > hi {
            return Err("a character class range runs backwards");
        }
        ranges.push((lo, hi));
    }
}

/// One character of a class (Go's `getEsc`): `-` and `]` must be escaped, and something must
/// follow.
fn class_char(chars: &[char], mut at: usize) -> Result<(char, usize), &'static str> {
    match chars.get(at) {
        None => return Err("a `[` character class is not closed"),
        Some('-') | Some(']') => {
            return Err("a character class has an unescaped `-` or `]` where a character belongs");
        }
        Some('\\') => at += 1,
        Some(_) => {}
    }
    let Some(&ch) = chars.get(at) else {
        return Err("a `[` character class is not closed");
    };
    if at + 1 >= chars.len() {
        return Err("a `[` character class is not closed");
    }
    Ok((ch, at + 1))
}

/// Whether `tokens` match all of `path`. Dynamic programming over token suffixes, one row
/// at a time, so time is `tokens × chars` and memory two rows, whatever the pattern.
fn match_tokens(tokens: &[Token], path: &str) -> bool {
    let s: Vec<char> = path.chars().collect();
    let n = s.len();
    // next[j]: tokens[i+1..] match s[j..]. Start with the empty token list.
    let mut next = vec![false; n + 1];
    next[n] = true;
    let mut row = vec![false; n + 1];
    for token in tokens.iter().rev() {
        match token {
            Token::Star | Token::AnyAll => {
                let crosses = *token == Token::AnyAll;
                row[n] = next[n];
                for j in (0..n).rev() {
                    row[j] = next[j] || ((crosses || s[j] != '/') && row[j + 1]);
                }
            }
            Token::AnyDirs => {
                // (.*/)? : nothing, or anything ending in a `/`.
                let mut slash_then_rest = false;
                row[n] = next[n];
                for j in (0..n).rev() {
                    slash_then_rest = slash_then_rest || (s[j] == '/' && next[j + 1]);
                    row[j] = next[j] || slash_then_rest;
                }
            }
            single => {
                row[n] = false;
                for j in 0..n {
                    row[j] = single_matches(single, s[j]) && next[j + 1];
                }
            }
        }
        std::mem::swap(&mut row, &mut next);
    }
    next[0]
}

fn single_matches(token: &Token, ch: char) -> bool {
    match token {
        Token::Lit(lit) => *lit == ch,
        Token::One => ch != '/',
        Token::Class { negated, ranges } => {
            ranges.iter().any(|(lo, hi)| *lo <= ch && ch <= *hi) != *negated
        }
        Token::Star | Token::AnyAll | Token::AnyDirs => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (.dockerignore text, path, excluded?)
    const CASES: &[(&str, &str, bool)] = &[
        // Plain names are relative to the context root, not any depth.
        ("foo", "foo", true),
        ("foo", "a/foo", false),
        // A matching directory excludes everything below it.
        ("foo", "foo/bar/baz.txt", true),
        ("dir/", "dir/file", true),
        ("dir/", "dir", true),
        // Trailing slash is cleaned away: it also matches a file named `dir`.
        ("dir/", "dirx", false),
        // `*` stays within one segment and at the root.
        ("*.md", "README.md", true),
        ("*.md", "a/b.md", false),
        ("*/*.md", "a/b.md", true),
        ("*/*.md", "a/b/c.md", false),
        // `**` crosses segments, including none.
        ("**/*.log", "x.log", true),
        ("**/*.log", "a/b/x.log", true),
        ("**/*.log", "a/b/x.txt", false),
        ("a/**/z", "a/z", true),
        ("a/**/z", "a/b/c/z", true),
        ("a/**", "a/b/c", true),
        ("a/**", "b/a/c", false),
        ("**", "anything/at/all", true),
        ("**/node_modules", "web/node_modules/x/y.js", true),
        // Leading `/` and `./` are stripped; `..` is cleaned.
        ("/abs", "abs", true),
        ("/abs", "x/abs", false),
        ("./a/../b", "b", true),
        // `?` and classes match one character, never `/` for `?`.
        ("file?.txt", "file1.txt", true),
        ("file?.txt", "file10.txt", false),
        ("a?b", "a/b", false),
        ("[a-c]x", "bx", true),
        ("[a-c]x", "dx", false),
        ("[^a-c]x", "dx", true),
        ("\\*x", "*x", true),
        ("\\*x", "ax", false),
        // Comments only at the start of a line; blank lines ignored.
        ("# foo\n\n   \nbar", "foo", false),
        ("# foo\n\n   \nbar", "bar", true),
        // Surrounding space is trimmed.
        ("  spaced  ", "spaced", true),
        // Exceptions re-include, last match wins.
        ("*.md\n!README.md", "README.md", false),
        ("*.md\n!README.md", "CHANGES.md", true),
        ("*.md\n!README.md\nREADME.md", "README.md", true),
        ("docs\n!docs/keep.md", "docs/keep.md", false),
        ("docs\n!docs/keep.md", "docs/drop.md", true),
        // An exception for a directory re-includes below it.
        ("*\n!src", "src/main.rs", false),
        ("*\n!src", "target/x", true),
        // Regular expression characters are literals.
        ("a.b", "axb", false),
        ("a+(b)", "a+(b)", true),
        // patternmatcher's suffix fast path: `**foo` matches any path ending in `foo`.
        ("**foo", "barfoo", true),
        // Windows line endings.
        ("a\r\nb\r\n", "b", true),
        // A BOM is not part of the first pattern.
        ("\u{feff}first", "first", true),
        // The root itself is never excluded.
        ("*", ".", false),
    ];

    #[test]
    fn table() {
        let mut failures = Vec::new();
        for (text, path, want) in CASES {
            let ignore = DockerIgnore::parse(text).unwrap();
            let got = ignore.is_excluded(path, false);
            if got != *want {
                failures.push(format!("{text:?} on {path:?}: got {got}, want {want}"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn bad_patterns_name_line_and_pattern() {
        for (text, line) in [
            ("ok\n[abc", 2),
            ("[]", 1),
            ("a\\", 1),
            ("[z-a]", 1),
            ("!", 1),
            ("x\n\n  !  ", 3),
        ] {
            match DockerIgnore::parse(text) {
                Err(DockerIgnoreError::BadPattern {
                    line: got, pattern, ..
                }) => {
                    assert_eq!(got, line, "{text:?}");
                    assert!(text.contains(pattern.trim()), "{text:?} named {pattern:?}");
                }
                other => panic!("{text:?}: expected a bad pattern, got {other:?}"),
            }
        }
    }

    #[test]
    fn over_long_line_is_refused() {
        let text = format!("a\n{}", "x".repeat(MAX_LINE_BYTES + 1));
        assert!(matches!(
            DockerIgnore::parse(&text),
            Err(DockerIgnoreError::LineTooLong { line: 2, .. })
        ));
    }

    #[test]
    fn keep_overrides_exclusion_like_the_docker_cli() {
        let mut ignore = DockerIgnore::parse("Dockerfile\n.dockerignore\ndocker").unwrap();
        assert!(ignore.is_excluded("docker/Dockerfile", false));
        ignore.keep("docker/Dockerfile");
        ignore.keep(".dockerignore");
        assert!(!ignore.is_excluded("docker/Dockerfile", false));
        assert!(!ignore.is_excluded(".dockerignore", false));
        assert!(ignore.is_excluded("docker/other", false));
        // The kept file's directory must still be walked.
        assert!(!ignore.skip_dir("docker"));
    }

    #[test]
    fn skip_dir_follows_docker_walker() {
        let ignore = DockerIgnore::parse("build\ndocs\n!docs/keep.md\nlogs\n!**/x").unwrap();
        assert!(ignore.skip_dir("build"));
        assert!(
            !ignore.skip_dir("docs"),
            "an exception names a path below docs"
        );
        // Docker skips `logs` although `!**/x` could match inside it.
        assert!(ignore.skip_dir("logs"));
        assert!(!ignore.skip_dir("src"), "not excluded at all");
    }

    #[test]
    fn clean_matches_go() {
        for (input, want) in [
            ("a/b/", "a/b"),
            ("./a", "a"),
            ("a//b", "a/b"),
            ("a/../..", ".."),
            ("/../a", "/a"),
            ("", "."),
            ("/", "/"),
        ] {
            assert_eq!(clean(input), want, "{input:?}");
        }
    }
}
