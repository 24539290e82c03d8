//! `cargo xtask layers`: tokio-zcrx's modules import each other only downwards.
//!
//! [`LAYERS`] is the layer order, written here once (the comment at the top of
//! `crates/tokio-zcrx/src/lib.rs` repeats it, and a test keeps the two equal). A module may
//! import only modules of layers listed before its own, and modules of one layer do not import
//! each other (the two backends are peers); inside one entry (`backend::uring`, `probe`, ...)
//! anything goes, except for the narrower [`RULES`]. Exceptions that cannot go yet are in
//! [`ALLOWED`], each with its reason.
//!
//! The check reads source text, not the compiler's view, so it needs no build and works on
//! whatever files exist: modules are named by their paths (`src/backend/uring/area.rs` is
//! `backend::uring::area`, `mod.rs` names its directory) and every rule is a module path
//! prefix, so moving or splitting files needs no change here. What counts as an import: every
//! `use` tree and every path in code that starts with `crate::`, `super::`, `self::` or a
//! child module's name, with comments and string literals removed; `crate::Name` re-exported
//! by `lib.rs` (`pub use buf::ZcBuf`) counts as the module it comes from. A path names the
//! longest module prefix that exists as a file.
//!
//! Test code may import anything, so it is skipped: items under `#[cfg(test)]` or
//! `#[cfg(all(test, ..))]` (a `mod tests { .. }`, a test-only `use`, `impl` or `fn`), and
//! whole files whose module is declared that way (`#[cfg(test)] mod scenarios;`), wherever
//! they live. The test-only status follows the declaration, not a directory name, so a
//! directory of tests is skipped exactly when its parent declares it `#[cfg(test)]`. Code
//! under `#[cfg(any(test, feature = ..))]` ships in some build, so it is checked.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The layer order, lowest first: a module may import only modules of earlier layers. The
/// names of one entry are peers that do not import each other. A module belongs to the entry
/// whose name is the longest prefix of its path (`backend` is `backend/mod.rs` itself, and
/// whatever no deeper entry claims; `""` is `lib.rs`).
pub(crate) const LAYERS: &[&[&str]] = &[
    &["error", "mode", "event", "privilege"],
    &["sys"],
    &["config"],
    &["buf"],
    // Queued sends' shared state (the write half and the driver meet here).
    &["send"],
    &["writer"],
    &["probe"],
    &["backend::wake"],
    &["backend::uring", "backend::copy"],
    &["backend"],
    &["backend::select"],
    &["stream"],
    // ZcConnection (stream + write half as one value); from the `api` branch.
    &["connection"],
    &["zcrx"],
    &["listener"],
    &[""],
];

/// Narrower rules inside one layer entry: modules matching `from` must not import modules
/// matching `to` (a pattern ending in `::*` also matches everything below).
const RULES: &[Rule] = &[
    Rule {
        from: "backend::uring::area::*",
        to: "backend::uring",
        why: "the area does not reach into the driver's shared state \
              (it wakes the driver through its DriverLink)",
    },
    Rule {
        from: "backend::uring::area::*",
        to: "backend::uring::driver::*",
        why: "the area does not import the driver (it wakes it through its DriverLink)",
    },
];

/// Imports that break the order on purpose, until the change that removes them.
const ALLOWED: &[Rule] = &[
    Rule {
        from: "backend::uring::synthetic",
        to: "zcrx",
        why: "bench-internals: the synthetic ring builds a `Zcrx` handle for the per-chunk \
              benchmark; goes when the harness moves to bench/ (issue 11 item 4)",
    },
    Rule {
        from: "backend::uring::synthetic",
        to: "backend",
        why: "bench-internals: the synthetic ring wraps its handle in `Backend::Uring` for \
              that `Zcrx`; goes with the harness as above",
    },
    Rule {
        from: "backend::uring::synthetic",
        to: "backend::queues",
        why: "bench-internals: the per-chunk benchmark's synthetic queue group \
              (`start_queues`) starts a `QueueGroup` over synthetic queues; goes with the \
              harness as above",
    },
];

struct Rule {
    from: &'static str,
    to: &'static str,
    why: &'static str,
}

fn pattern_matches(pattern: &str, module: &str) -> bool {
    match pattern.strip_suffix("::*") {
        Some(prefix) => is_within(prefix, module),
        None => pattern == module,
    }
}

/// Whether `module` is `prefix` or below it.
fn is_within(prefix: &str, module: &str) -> bool {
    prefix.is_empty()
        || module == prefix
        || module
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with("::"))
}

/// The layer entry of `module`: (layer index, entry name).
fn layer_of(module: &str) -> (usize, &'static str) {
    LAYERS
        .iter()
        .enumerate()
        .flat_map(|(index, names)| names.iter().map(move |name| (index, *name)))
        .filter(|(_, name)| is_within(name, module))
        .max_by_key(|(_, name)| name.len())
        .expect("\"\" matches every module")
}

/// The order as `lib.rs`'s comment writes it.
pub(crate) fn order_line() -> String {
    LAYERS
        .iter()
        .map(|names| {
            names
                .iter()
                .map(|name| if name.is_empty() { "lib" } else { name })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .collect::<Vec<_>>()
        .join(" -> ")
}

/// One import that breaks the order.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Violation {
    pub(crate) file: PathBuf,
    pub(crate) line: usize,
    /// The path as written, e.g. `crate::backend::copy::Pool`.
    pub(crate) path: String,
    pub(crate) from: String,
    pub(crate) to: String,
    pub(crate) rule: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = |m: &str| {
            if m.is_empty() {
                "lib".to_string()
            } else {
                m.to_string()
            }
        };
        write!(
            f,
            "{}:{}: `{}`: {} imports {}: {}",
            self.file.display(),
            self.line,
            self.path,
            name(&self.from),
            name(&self.to),
            self.rule
        )
    }
}

/// Checks the crate whose `src` directory is `src`; file names in the result are `src`-relative
/// joined onto `shown_as`.
pub(crate) fn check_dir(src: &Path, shown_as: &Path) -> Result<Vec<Violation>> {
    let mut files = Vec::new();
    collect(src, src, &mut files)?;
    let mut violations = check(&files, ALLOWED);
    for v in &mut violations {
        v.file = shown_as.join(&v.file);
    }
    Ok(violations)
}

fn collect(root: &Path, dir: &Path, files: &mut Vec<(PathBuf, String)>) -> Result<()> {
    let mut entries = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<std::io::Result<Vec<_>>>()?;
    entries.sort_by_key(|e| e.path());
    for entry in entries {
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            collect(root, &path, files)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            files.push((path.strip_prefix(root)?.to_path_buf(), text));
        }
    }
    Ok(())
}

/// The module a file under `src` defines, or `None` for a file that is not a module (none
/// today; `main.rs` and `bin/` would be other crates).
fn module_of(path: &Path) -> Option<String> {
    let mut parts: Vec<String> = path
        .iter()
        .map(|part| part.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop()?.strip_suffix(".rs")?.to_string();
    if parts.is_empty() && last == "lib" {
        return Some(String::new());
    }
    if last != "mod" {
        parts.push(last);
    }
    Some(parts.join("::"))
}

fn join(module: &str, child: &str) -> String {
    if module.is_empty() {
        child.to_string()
    } else {
        format!("{module}::{child}")
    }
}

/// Checks a crate given as (`src`-relative path, contents) pairs, except for `allowed`.
fn check(files: &[(PathBuf, String)], allowed: &[Rule]) -> Vec<Violation> {
    let parsed: Vec<(PathBuf, String, Vec<Token>)> = files
        .iter()
        .filter_map(|(path, text)| Some((path.clone(), module_of(path)?, tokenize(text))))
        .collect();
    let known: BTreeSet<String> = parsed.iter().map(|(_, m, _)| m.clone()).collect();
    let mut test_only = BTreeSet::new();
    let mut scans = Vec::new();
    for (path, module, tokens) in &parsed {
        let found = scan(module, tokens);
        test_only.extend(found.test_only_children.iter().cloned());
        scans.push((path, module, found));
    }
    let ctx = Resolver {
        known: &known,
        reexports: BTreeMap::new(),
    };
    // `crate::Name` for names `lib.rs` re-exports.
    let mut reexports = BTreeMap::new();
    for (_, module, scan) in &scans {
        if module.is_empty() {
            for import in scan.imports.iter().filter(|i| i.public_use) {
                if let (Some(target), Some(name)) = (ctx.resolve(import), import.segments.last()) {
                    reexports.insert(name.clone(), target);
                }
            }
        }
    }
    let ctx = Resolver {
        known: &known,
        reexports,
    };
    let mut violations = Vec::new();
    for (path, module, scan) in &scans {
        if test_only.iter().any(|t| is_within(t, module)) || scan.file_is_test_only {
            continue;
        }
        for import in &scan.imports {
            let Some(to) = ctx.resolve(import) else {
                continue;
            };
            if let Some(rule) = broken_rule(&import.module, &to, allowed) {
                violations.push(Violation {
                    file: (*path).clone(),
                    line: import.line,
                    path: import.written.clone(),
                    from: import.module.clone(),
                    to,
                    rule,
                });
            }
        }
    }
    violations
}

/// The rule an import from module `from` of module `to` breaks, if any.
fn broken_rule(from: &str, to: &str, allowed: &[Rule]) -> Option<String> {
    if allowed
        .iter()
        .any(|a| pattern_matches(a.from, from) && pattern_matches(a.to, to))
    {
        return None;
    }
    if let Some(rule) = RULES
        .iter()
        .find(|r| pattern_matches(r.from, from) && pattern_matches(r.to, to))
    {
        return Some(rule.why.to_string());
    }
    let (from_layer, from_entry) = layer_of(from);
    let (to_layer, to_entry) = layer_of(to);
    let shown = |entry: &str| if entry.is_empty() { "lib" } else { entry }.to_string();
    if from_entry == to_entry || to_layer < from_layer {
        None
    } else if to_layer == from_layer {
        Some(format!(
            "{} and {} are peers in one layer, which do not import each other",
            shown(from_entry),
            shown(to_entry),
        ))
    } else {
        Some(format!(
            "{} is in a layer above {}: a module imports only layers listed before its own",
            shown(to_entry),
            shown(from_entry),
        ))
    }
}

struct Resolver<'a> {
    known: &'a BTreeSet<String>,
    /// Names `lib.rs` re-exports, and the module each comes from.
    reexports: BTreeMap<String, String>,
}

impl Resolver<'_> {
    /// The module an import names, or `None` for paths outside the crate (`std::`, `tokio::`,
    /// locals).
    fn resolve(&self, import: &Import) -> Option<String> {
        let segments = &import.segments;
        let first = segments.first()?;
        let (mut base, rest) = match first.as_str() {
            "crate" => {
                if let Some(module) = segments.get(1).and_then(|n| self.reexports.get(n)) {
                    (module.clone(), &segments[2..])
                } else {
                    (String::new(), &segments[1..])
                }
            }
            "self" => (import.module.clone(), &segments[1..]),
            "super" => {
                let mut module = import.module.clone();
                let mut rest = &segments[..];
                while rest.first().is_some_and(|s| s == "super") {
                    module = match module.rfind("::") {
                        Some(at) => module[..at].to_string(),
                        None => String::new(),
                    };
                    rest = &rest[1..];
                }
                (module, rest)
            }
            child if self.known.contains(&join(&import.module, child)) => {
                (import.module.clone(), &segments[..])
            }
            _ => return None,
        };
        // The longest prefix that is a module file.
        for segment in rest {
            let next = join(&base, segment);
            if self.known.contains(&next) {
                base = next;
            } else {
                break;
            }
        }
        Some(base)
    }
}

/// One path that names something in the crate, as written.
#[derive(Debug)]
struct Import {
    /// The module the path is written in (inline `mod x { }` blocks included).
    module: String,
    segments: Vec<String>,
    written: String,
    line: usize,
    /// Part of a `pub use` (for `lib.rs`'s re-exports).
    public_use: bool,
}

#[derive(Default)]
struct Scan {
    imports: Vec<Import>,
    /// Modules declared `#[cfg(test)] mod name;` in this file.
    test_only_children: Vec<String>,
    /// An inner `#![cfg(test)]`.
    file_is_test_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    /// `::`
    PathSep,
    Punct(char),
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    line: usize,
}

/// Identifiers, `::` and single punctuation; comments, strings, character and number
/// literals' contents and lifetimes are dropped.
fn tokenize(text: &str) -> Vec<Token> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut line = 1;
    let mut i = 0;
    let count_lines = |from: usize, to: usize, line: &mut usize| {
        *line += chars[from..to.min(chars.len())]
            .iter()
            .filter(|&&c| c == '\n')
            .count();
    };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let start = i;
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            count_lines(start, i, &mut line);
        } else if c == '"' || ((c == 'b' || c == 'c') && next == Some('"')) {
            let start = i;
            i += if c == '"' { 1 } else { 2 };
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            count_lines(start, i, &mut line);
        } else if let Some(end) = raw_string_end(&chars, i) {
            count_lines(i, end, &mut line);
            i = end;
        } else if c == '\'' {
            // A character literal ('x', '\n', '\u{..}') or a lifetime ('a).
            if next == Some('\\') {
                // The quote, the backslash and the escaped character, then to the closing quote.
                i += 3;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if chars.get(i + 2) == Some(&'\'') {
                i += 3;
            } else {
                i += 1;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
            }
        } else if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            // `r#ident`
            let word = match (word.as_str(), chars.get(i)) {
                ("r", Some('#')) => {
                    i += 1;
                    continue;
                }
                _ => word,
            };
            tokens.push(Token {
                tok: Tok::Ident(word),
                line,
            });
        } else if c == ':' && next == Some(':') {
            tokens.push(Token {
                tok: Tok::PathSep,
                line,
            });
            i += 2;
        } else {
            tokens.push(Token {
                tok: Tok::Punct(c),
                line,
            });
            i += 1;
        }
    }
    tokens
}

/// The end of a raw string literal (`r"..."`, `r#"..."#`, `br#"..."#`) starting at `i`.
fn raw_string_end(chars: &[char], i: usize) -> Option<usize> {
    let mut j = i;
    if chars.get(j) == Some(&'b') || chars.get(j) == Some(&'c') {
        j += 1;
    }
    if chars.get(j) != Some(&'r') {
        return None;
    }
    // Not part of a longer identifier.
    if i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_') {
        return None;
    }
    j += 1;
    let hashes = chars[j..].iter().take_while(|&&c| c == '#').count();
    j += hashes;
    if chars.get(j) != Some(&'"') {
        return None;
    }
    j += 1;
    while j < chars.len() {
        if chars[j] == '"'
            && chars[j + 1..].iter().take(hashes).all(|&c| c == '#')
            && chars.len() >= j + 1 + hashes
        {
            return Some(j + 1 + hashes);
        }
        j += 1;
    }
    Some(chars.len())
}

fn ident(tokens: &[Token], i: usize) -> Option<&str> {
    match tokens.get(i).map(|t| &t.tok) {
        Some(Tok::Ident(word)) => Some(word),
        _ => None,
    }
}

fn is_punct(tokens: &[Token], i: usize, c: char) -> bool {
    tokens.get(i).is_some_and(|t| t.tok == Tok::Punct(c))
}

fn is_sep(tokens: &[Token], i: usize) -> bool {
    tokens.get(i).is_some_and(|t| t.tok == Tok::PathSep)
}

/// The index after the bracket group opening at `i` (`(`, `[` or `{`).
fn skip_group(tokens: &[Token], i: usize) -> usize {
    let mut depth = 0usize;
    let mut j = i;
    while j < tokens.len() {
        match tokens[j].tok {
            Tok::Punct('(' | '[' | '{') => depth += 1,
            Tok::Punct(')' | ']' | '}') => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return j + 1;
                }
            }
            _ => {}
        }
        j += 1;
    }
    tokens.len()
}

/// Whether the attribute whose `[` is at `open` (up to `close`) is `cfg(test)` or
/// `cfg(all(.., test, ..))`: code that exists only in test builds.
fn is_test_only_cfg(tokens: &[Token], open: usize, close: usize) -> bool {
    let inner = &tokens[open + 1..close - 1];
    if ident(inner, 0) != Some("cfg") || !is_punct(inner, 1, '(') {
        return false;
    }
    if ident(inner, 2) == Some("test") && is_punct(inner, 3, ')') {
        return true;
    }
    if ident(inner, 2) == Some("all") && is_punct(inner, 3, '(') {
        // A `test` directly inside all(..).
        let mut depth = 0;
        for (k, token) in inner.iter().enumerate().skip(3) {
            match token.tok {
                Tok::Punct('(') => depth += 1,
                Tok::Punct(')') => depth -= 1,
                Tok::Ident(ref w) if w == "test" && depth == 1 => {
                    let before = &inner[k - 1].tok;
                    let after = inner.get(k + 1).map(|t| &t.tok);
                    if matches!(before, Tok::Punct('(' | ','))
                        && matches!(after, Some(Tok::Punct(')' | ',')))
                    {
                        return true;
                    }
                }
                _ => {}
            }
        }
    }
    false
}

/// Finds the crate paths in one file of module `module`.
fn scan(module: &str, tokens: &[Token]) -> Scan {
    let mut out = Scan::default();
    // Inline modules: (name, brace depth inside them).
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let current = |inline: &[(String, usize)]| {
        inline
            .iter()
            .fold(module.to_string(), |m, (name, _)| join(&m, name))
    };
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i].tok {
            Tok::Punct('#') => {
                let inner_attr = is_punct(tokens, i + 1, '!');
                let open = if inner_attr { i + 2 } else { i + 1 };
                if !is_punct(tokens, open, '[') {
                    i += 1;
                    continue;
                }
                let close = skip_group(tokens, open);
                if !is_test_only_cfg(tokens, open, close) {
                    i = close;
                    continue;
                }
                if inner_attr {
                    // `#![cfg(test)]` at the top of a file. (Inside an inline module it is
                    // not recognised, and that module's code is checked: stricter, never
                    // laxer.)
                    if inline.is_empty() {
                        out.file_is_test_only = true;
                        return out;
                    }
                    i = close;
                    continue;
                }
                // Skip the item this attribute applies to (further attributes included).
                let mut j = close;
                while is_punct(tokens, j, '#') && is_punct(tokens, j + 1, '[') {
                    j = skip_group(tokens, j + 1);
                }
                let item_start = j;
                while j < tokens.len() {
                    match tokens[j].tok {
                        Tok::Punct(';') => {
                            j += 1;
                            break;
                        }
                        Tok::Punct('{') => {
                            j = skip_group(tokens, j);
                            break;
                        }
                        Tok::Punct('(' | '[') => j = skip_group(tokens, j),
                        _ => j += 1,
                    }
                }
                // `mod name;`: a whole file (and what is below it) of test code.
                let words: Vec<&str> = (item_start..j).filter_map(|k| ident(tokens, k)).collect();
                if let Some(at) = words.iter().position(|w| *w == "mod") {
                    if is_punct(tokens, j - 1, ';') {
                        if let Some(name) = words.get(at + 1) {
                            out.test_only_children.push(join(&current(&inline), name));
                        }
                    }
                }
                i = j;
            }
            Tok::Punct('{') => {
                depth += 1;
                i += 1;
            }
            Tok::Punct('}') => {
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
                i += 1;
            }
            Tok::Ident(word) if word == "mod" => {
                if let (Some(name), true) = (ident(tokens, i + 1), is_punct(tokens, i + 2, '{')) {
                    depth += 1;
                    inline.push((name.to_string(), depth));
                    i += 3;
                } else {
                    i += 1;
                }
            }
            Tok::Ident(word) if word == "use" => {
                // `pub use`, `pub(crate) use`, `pub(in a::b) use`.
                let public = i > 0
                    && (ident(tokens, i - 1) == Some("pub")
                        || (is_punct(tokens, i - 1, ')')
                            && (0..i)
                                .rev()
                                .take(8)
                                .any(|k| ident(tokens, k) == Some("pub"))));
                let module = current(&inline);
                let mut j = i + 1;
                // A leading `::` (2015-style absolute path) names an external crate.
                if !is_sep(tokens, j) {
                    parse_use_tree(tokens, &mut j, &[], &module, public, &mut out.imports);
                } else {
                    while j < tokens.len() && !is_punct(tokens, j, ';') {
                        j += 1;
                    }
                }
                i = j;
            }
            Tok::Ident(word) => {
                // A path in code: `crate::x::y`, `super::x`, `self::x`, `child::x`; not the
                // `in crate::x` of a `pub(in ..)` visibility, not the tail of a longer path.
                let continues_path = i > 0 && is_sep(tokens, i - 1);
                let visibility = i > 0 && ident(tokens, i - 1) == Some("in");
                if !continues_path && !visibility && is_sep(tokens, i + 1) {
                    let line = tokens[i].line;
                    let mut segments = vec![word.clone()];
                    let mut j = i + 1;
                    while is_sep(tokens, j) {
                        match ident(tokens, j + 1) {
                            Some(next) => {
                                segments.push(next.to_string());
                                j += 2;
                            }
                            None => break,
                        }
                    }
                    out.imports.push(Import {
                        module: current(&inline),
                        written: segments.join("::"),
                        segments,
                        line,
                        public_use: false,
                    });
                    i = j;
                } else {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    out
}

/// Parses one use tree at `*i` (after `use`, or inside `{ }`), adding its leaves.
fn parse_use_tree(
    tokens: &[Token],
    i: &mut usize,
    prefix: &[String],
    module: &str,
    public: bool,
    imports: &mut Vec<Import>,
) {
    let mut segments = prefix.to_vec();
    let line = tokens.get(*i).map_or(0, |t| t.line);
    loop {
        if is_punct(tokens, *i, '{') {
            *i += 1;
            while *i < tokens.len() && !is_punct(tokens, *i, '}') {
                let before = *i;
                parse_use_tree(tokens, i, &segments, module, public, imports);
                if is_punct(tokens, *i, ',') || *i == before {
                    *i += 1;
                }
            }
            *i += 1; // `}`
            break;
        }
        if is_punct(tokens, *i, '*') {
            *i += 1;
            leaf(&segments, line, module, public, imports);
            break;
        }
        let Some(word) = ident(tokens, *i) else {
            break;
        };
        *i += 1;
        // `a::{self, b}`: the `self` names `a` itself.
        if word != "self" || segments.is_empty() {
            segments.push(word.to_string());
        }
        if is_sep(tokens, *i) {
            *i += 1;
            continue;
        }
        if ident(tokens, *i) == Some("as") {
            *i += 2;
        }
        leaf(&segments, line, module, public, imports);
        break;
    }
    if prefix.is_empty() {
        // The top-level tree ends at `;`.
        while *i < tokens.len() && !is_punct(tokens, *i, ';') {
            *i += 1;
        }
    }
}

fn leaf(segments: &[String], line: usize, module: &str, public: bool, imports: &mut Vec<Import>) {
    if segments.is_empty() {
        return;
    }
    imports.push(Import {
        module: module.to_string(),
        written: segments.join("::"),
        segments: segments.to_vec(),
        line,
        public_use: public,
    });
}

/// `cargo xtask layers [SRC]`: checks `SRC` (default: tokio-zcrx's `src` in this workspace).
pub(crate) fn run(src: Option<&str>) -> Result<bool> {
    let shown = Path::new(src.unwrap_or("crates/tokio-zcrx/src"));
    let dir = match src {
        Some(src) => PathBuf::from(src),
        None => crate::util::workspace_root().join(shown),
    };
    let violations = check_dir(&dir, shown)?;
    for v in &violations {
        eprintln!("{v}");
    }
    if violations.is_empty() {
        println!(
            "layers: tokio-zcrx imports follow the layer order: {}",
            order_line()
        );
    } else {
        eprintln!(
            "layers: {} import(s) break the layer order, lowest first (xtask/src/layers.rs): {}",
            violations.len(),
            order_line()
        );
    }
    Ok(violations.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(list: &[(&str, &str)]) -> Vec<(PathBuf, String)> {
        list.iter()
            .map(|(p, t)| (PathBuf::from(p), t.to_string()))
            .collect()
    }

    /// A small crate shaped like tokio-zcrx, with nothing wrong.
    fn base() -> Vec<(&'static str, &'static str)> {
        vec![
            (
                "lib.rs",
                "mod backend;\nmod buf;\nmod config;\npub use buf::{ZcBatch, ZcBuf};\n\
                 pub use config::Builder;\n",
            ),
            ("buf.rs", "use std::fmt;\npub struct ZcBuf;\n"),
            ("config.rs", "pub struct Builder;\n"),
            (
                "backend/mod.rs",
                "pub(crate) mod copy;\npub(crate) mod uring;\n",
            ),
            (
                "backend/copy/mod.rs",
                "use crate::buf::ZcBuf;\nuse crate::config::Builder;\n",
            ),
            (
                "backend/uring/mod.rs",
                "pub(crate) mod area;\npub(crate) mod driver;\npub(crate) struct DriverShared;\n",
            ),
            ("backend/uring/area.rs", "use crate::{ZcBuf, config};\n"),
            ("backend/uring/driver.rs", "use super::area::Area;\n"),
        ]
    }

    fn check_with(extra: &[(&str, &str)]) -> Vec<Violation> {
        let mut list = base();
        for (path, text) in extra {
            list.retain(|(p, _)| p != path);
            list.push((path, text));
        }
        check(&files(&list), ALLOWED)
    }

    #[test]
    fn a_clean_tree_passes() {
        assert_eq!(check_with(&[]), Vec::new());
    }

    #[test]
    fn an_upward_import_fails_with_file_line_and_rule() {
        let found = check_with(&[(
            "buf.rs",
            "use std::fmt;\n\nuse crate::backend::copy::Pool;\npub struct ZcBuf;\n",
        )]);
        assert_eq!(found.len(), 1, "{found:?}");
        let v = &found[0];
        assert_eq!((v.file.to_str(), v.line), (Some("buf.rs"), 3));
        assert_eq!((v.from.as_str(), v.to.as_str()), ("buf", "backend::copy"));
        let shown = v.to_string();
        assert!(
            shown.starts_with("buf.rs:3: `crate::backend::copy::Pool`: buf imports backend::copy: backend::copy is in a layer above buf"),
            "{shown}"
        );
    }

    #[test]
    fn every_way_of_naming_a_module_is_seen() {
        // A path in code, a grouped import, a re-export of the crate root, `super::`.
        let found = check_with(&[
            (
                "config.rs",
                "pub struct Builder;\nfn f() { let _ = crate::backend::uring::area::x(); }\n",
            ),
            (
                "buf.rs",
                "use crate::{config::Builder, Builder as B};\nuse crate::{backend::{copy}};\n",
            ),
            (
                "backend/uring/area.rs",
                "use super::DriverShared;\nuse super::super::copy::X;\n",
            ),
        ]);
        let seen: Vec<(String, usize, String)> = found
            .iter()
            .map(|v| (v.file.display().to_string(), v.line, v.to.clone()))
            .collect();
        assert_eq!(
            seen,
            vec![
                ("config.rs".into(), 2, "backend::uring::area".into()),
                ("buf.rs".into(), 2, "backend::copy".into()),
                ("backend/uring/area.rs".into(), 1, "backend::uring".into()),
                ("backend/uring/area.rs".into(), 2, "backend::copy".into()),
            ]
        );
        // The area's own rule, and the peers' rule.
        assert!(
            found[2].rule.contains("driver's shared state"),
            "{}",
            found[2].rule
        );
        assert!(found[3].rule.contains("peers"), "{}", found[3].rule);
    }

    #[test]
    fn test_code_comments_and_strings_are_skipped() {
        let found = check_with(&[
            (
                "buf.rs",
                "// use crate::backend::copy::Pool;\n/* crate::zcrx */\n\
                 const S: &str = \"crate::backend::copy\";\nconst R: &str = r#\"crate::backend\"#;\n\
                 fn f<'a>(c: char) -> bool { c == '{' }\n\
                 #[cfg(test)]\nmod tests {\n    use crate::backend::copy::Pool;\n}\n\
                 #[cfg(all(test, feature = \"x\"))]\nuse crate::backend::uring::driver;\n\
                 #[cfg(test)]\nmod scenarios;\npub struct ZcBuf;\n",
            ),
            ("buf/scenarios.rs", "use crate::backend::copy::Pool;\n"),
            ("buf/scenarios/deeper.rs", "use crate::backend::copy::Pool;\n"),
        ]);
        assert_eq!(found, Vec::new());
        // `cfg(any(test, ..))` code ships in some build: checked.
        let found = check_with(&[(
            "buf.rs",
            "#[cfg(any(test, feature = \"x\"))]\nuse crate::backend::copy::Pool;\n",
        )]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].line, 2);
    }

    #[test]
    fn the_real_crate_follows_the_order() {
        let root = crate::util::workspace_root();
        let shown = Path::new("crates/tokio-zcrx/src");
        let violations = check_dir(&root.join(shown), shown).unwrap();
        let shown: Vec<String> = violations.iter().map(ToString::to_string).collect();
        assert!(shown.is_empty(), "{}", shown.join("\n"));
    }

    #[test]
    fn every_allowance_is_still_needed() {
        let src = crate::util::workspace_root().join("crates/tokio-zcrx/src");
        let mut list = Vec::new();
        collect(&src, &src, &mut list).unwrap();
        let without = check(&list, &[]);
        for allowed in ALLOWED {
            assert!(
                without
                    .iter()
                    .any(|v| pattern_matches(allowed.from, &v.from)
                        && pattern_matches(allowed.to, &v.to)),
                "the allowance {} -> {} is no longer needed: remove it from ALLOWED",
                allowed.from,
                allowed.to
            );
        }
    }

    #[test]
    fn lib_rs_states_the_same_order() {
        let lib = std::fs::read_to_string(
            crate::util::workspace_root().join("crates/tokio-zcrx/src/lib.rs"),
        )
        .unwrap();
        let line = order_line();
        // The comment may wrap; compare without line breaks and comment markers.
        let flat: String = lib
            .lines()
            .map(|l| l.trim_start().trim_start_matches("//").trim())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            flat.contains(&line),
            "lib.rs must state the layer order: {line}"
        );
    }
}
