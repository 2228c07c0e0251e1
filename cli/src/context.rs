//! Build contexts: a directory packed as the uncompressed tar that
//! `docker build` / `podman build` upload, for a builder running Podman's
//! libpod build API. [`find_dockerfile`] picks the Dockerfile,
//! [`IgnoreRules`] reads `.containerignore` / `.dockerignore` with Docker's
//! semantics (moby/patternmatcher), [`pack`] writes the tar.

use anyhow::{bail, Context};
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

/// The files looked for when no --dockerfile is given, in order.
pub const DOCKERFILE_NAMES: &[&str] = &["Containerfile", "Dockerfile"];

/// The ignore files, in order of preference (Podman reads the first).
const IGNORE_FILES: &[&str] = &[".containerignore", ".dockerignore"];

/// Finds the Dockerfile: `explicit` (relative to the current directory or
/// absolute, as the user typed it) or the first of [`DOCKERFILE_NAMES`] in
/// `dir`. Returns its path relative to `dir` with '/' separators (what the
/// builder's `dockerfile` parameter takes). Symlinks are resolved, as docker
/// does, so the result names a regular file inside the context.
pub fn find_dockerfile(dir: &Path, explicit: Option<&Path>) -> anyhow::Result<String> {
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => bail!("build context {}: not a directory", dir.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            bail!("build context {}: not a directory (it does not exist)", dir.display())
        }
        Err(e) => return Err(e).with_context(|| format!("build context {}", dir.display())),
    }
    let root = dir
        .canonicalize()
        .with_context(|| format!("build context {}", dir.display()))?;
    let outside = |p: &Path| match explicit {
        Some(_) => format!(
            "--dockerfile {} is outside the build context {}",
            p.display(),
            dir.display()
        ),
        None => format!("{} links outside the build context {}", p.display(), dir.display()),
    };
    let path = match explicit {
        Some(p) => {
            match fs::metadata(p) {
                Ok(m) if m.is_file() => {}
                Ok(_) => bail!("--dockerfile {}: not a file", p.display()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    bail!("--dockerfile {}: no such file", p.display())
                }
                Err(e) => return Err(e).with_context(|| format!("--dockerfile {}", p.display())),
            }
            p.to_path_buf()
        }
        None => match DOCKERFILE_NAMES.iter().map(|n| dir.join(n)).find(|p| p.is_file()) {
            Some(p) => p,
            None => bail!(
                "no Dockerfile in {}: looked for {}; name one with --dockerfile",
                dir.display(),
                DOCKERFILE_NAMES.join(", ")
            ),
        },
    };
    let real = path
        .canonicalize()
        .with_context(|| format!("resolving {}", path.display()))?;
    let rel = real.strip_prefix(&root).map_err(|_| anyhow::anyhow!(outside(&path)))?;
    let mut parts = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(s) => match s.to_str() {
                Some(s) => parts.push(s),
                None => bail!("Dockerfile path {} is not UTF-8", rel.display()),
            },
            _ => bail!(outside(&path)),
        }
    }
    if parts.is_empty() {
        bail!(outside(&path));
    }
    Ok(parts.join("/"))
}

/// The ignore rules of `dir`: `.containerignore` if present, else
/// `.dockerignore`, else none.
#[derive(Debug, Clone, Default)]
pub struct IgnoreRules {
    patterns: Vec<Pattern>,
    file: Option<&'static str>,
}

#[derive(Debug, Clone)]
struct Pattern {
    exception: bool,
    tokens: Vec<Token>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Char(char),
    /// `?`: one non-separator char.
    AnyChar,
    /// `[...]`: one non-separator char in (or, negated, not in) the ranges.
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
    /// `*`: any run of non-separator chars.
    Star,
    /// `**` before more pattern: nothing, or anything ending in '/' (regex `(.*/)?`).
    AnyDirs,
    /// `**` at the end: anything.
    AnyTail,
}

impl IgnoreRules {
    /// Reads `.containerignore`, else `.dockerignore`, from `dir`; no file
    /// means no rules. A malformed pattern is an error naming its line.
    pub fn load(dir: &Path) -> anyhow::Result<IgnoreRules> {
        for &name in IGNORE_FILES {
            let path = dir.join(name);
            let bytes = match fs::read(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            };
            let (mut rules, errors) = parse_lines(&String::from_utf8_lossy(&bytes));
            if let Some((line, pattern, why)) = errors.first() {
                bail!("{} line {line}: {why}: {pattern}", path.display());
            }
            rules.file = Some(name);
            return Ok(rules);
        }
        Ok(IgnoreRules::default())
    }

    /// Parses ignore-file text; malformed patterns are dropped (they match
    /// nothing). [`IgnoreRules::load`] reports them instead.
    pub fn parse(text: &str) -> IgnoreRules {
        parse_lines(text).0
    }

    /// The ignore file the rules came from (`.containerignore` or
    /// `.dockerignore`), if any.
    pub fn file(&self) -> Option<&'static str> {
        self.file
    }

    /// Whether the path (relative to the context root, '/'-separated, no
    /// leading "./") is excluded.
    pub fn excluded(&self, rel: &str) -> bool {
        let path: Vec<char> = rel.trim_end_matches('/').chars().collect();
        // Docker tries each pattern on the path and on each of its parent dirs.
        let mut ends: Vec<usize> = path
            .iter()
            .enumerate()
            .filter(|(_, &c)| c == '/')
            .map(|(i, _)| i)
            .collect();
        ends.push(path.len());
        let mut excluded = false;
        for p in &self.patterns {
            // Last match wins, so a pattern that cannot flip the state is skipped.
            if p.exception != excluded {
                continue;
            }
            if ends.iter().any(|&n| run(&p.tokens, &path[..n], false)) {
                excluded = !p.exception;
            }
        }
        excluded
    }

    /// Whether some `!` exception could match a path under directory `rel`:
    /// if none can, an excluded directory need not be walked.
    fn may_reinclude_below(&self, rel: &str) -> bool {
        let prefix: Vec<char> = rel.trim_end_matches('/').chars().chain(['/']).collect();
        self.patterns
            .iter()
            .any(|p| p.exception && run(&p.tokens, &prefix, true))
    }
}

/// Rules plus (line number, pattern, what is wrong) for malformed lines.
fn parse_lines(text: &str) -> (IgnoreRules, Vec<(usize, String, &'static str)>) {
    let mut rules = IgnoreRules::default();
    let mut errors = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = if n == 0 {
            line.trim_start_matches('\u{feff}')
        } else {
            line
        };
        // Docker checks for '#' before trimming: " #x" is a pattern.
        if line.starts_with('#') {
            continue;
        }
        let mut p = line.trim();
        if p.is_empty() {
            continue;
        }
        let exception = p.starts_with('!');
        if exception {
            p = p[1..].trim();
            if p.is_empty() {
                errors.push((n + 1, line.trim().to_string(), "a lone \"!\" names nothing"));
                continue;
            }
        }
        let cleaned = clean(p);
        let cleaned = match cleaned.strip_prefix('/') {
            Some(rest) if !rest.is_empty() => rest.to_string(),
            _ => cleaned,
        };
        match compile(&cleaned) {
            Ok(tokens) => rules.patterns.push(Pattern { exception, tokens }),
            Err(why) => errors.push((n + 1, line.trim().to_string(), why)),
        }
    }
    (rules, errors)
}

/// Go's `filepath.Clean` for '/' paths: drops empty and "." elements and
/// trailing slashes, resolves ".." lexically.
fn clean(p: &str) -> String {
    let rooted = p.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for seg in p.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|l| *l != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            s => parts.push(s),
        }
    }
    let body = parts.join("/");
    match (rooted, body.is_empty()) {
        (true, _) => format!("/{body}"),
        (false, true) => ".".into(),
        (false, false) => body,
    }
}

fn compile(p: &str) -> Result<Vec<Token>, &'static str> {
    let chars: Vec<char> = p.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        match c {
            '*' if chars.get(i) == Some(&'*') => {
                i += 1;
                // "**/" is "**": the regex it stands for already ends in '/'.
                if chars.get(i) == Some(&'/') {
                    i += 1;
                }
                out.push(if i == chars.len() {
                    Token::AnyTail
                } else {
                    Token::AnyDirs
                });
            }
            '*' => out.push(Token::Star),
            '?' => out.push(Token::AnyChar),
            '\\' => match chars.get(i) {
                Some(&e) => {
                    out.push(Token::Char(e));
                    i += 1;
                }
                None => return Err("trailing backslash"),
            },
            '[' => {
                let negated = matches!(chars.get(i), Some('^' | '!'));
                if negated {
                    i += 1;
                }
                let mut ranges = Vec::new();
                loop {
                    match chars.get(i) {
                        None => return Err("unclosed character class"),
                        Some(']') if !ranges.is_empty() => {
                            i += 1;
                            break;
                        }
                        Some(']') => return Err("empty character class"),
                        _ => {}
                    }
                    let lo = class_char(&chars, &mut i)?;
                    let hi = if chars.get(i) == Some(&'-') && chars.get(i + 1).is_some_and(|&c| c != ']') {
                        i += 1;
                        class_char(&chars, &mut i)?
                    } else {
                        lo
                    };
                    if hi < lo {
                        return Err("bad range in character class");
                    }
                    ranges.push((lo, hi));
                }
                out.push(Token::Class { negated, ranges });
            }
            c => out.push(Token::Char(c)),
        }
    }
    Ok(out)
}

fn class_char(chars: &[char], i: &mut usize) -> Result<char, &'static str> {
    let c = match chars.get(*i) {
        Some('\\') => {
            *i += 1;
            chars.get(*i).copied()
        }
        c => c.copied(),
    };
    *i += 1;
    c.ok_or("unclosed character class")
}

/// Whether `tokens` match all of `s`, or, with `partial`, whether they match
/// `s` followed by something more.
fn run(tokens: &[Token], s: &[char], partial: bool) -> bool {
    // Memo of (token, char) positions known to fail keeps `*`/`**` linear-ish.
    let mut failed = vec![false; (tokens.len() + 1) * (s.len() + 1)];
    go(tokens, s, 0, 0, partial, &mut failed)
}

fn go(t: &[Token], s: &[char], ti: usize, si: usize, partial: bool, failed: &mut [bool]) -> bool {
    if ti == t.len() {
        return si == s.len() && !partial;
    }
    if si == s.len() && partial {
        return true;
    }
    let key = ti * (s.len() + 1) + si;
    if failed[key] {
        return false;
    }
    let one = |ok: &dyn Fn(char) -> bool| s.get(si).is_some_and(|&c| c != '/' && ok(c));
    let ok = match &t[ti] {
        Token::Char(c) => s.get(si) == Some(c) && go(t, s, ti + 1, si + 1, partial, failed),
        Token::AnyChar => one(&|_| true) && go(t, s, ti + 1, si + 1, partial, failed),
        Token::Class { negated, ranges } => {
            one(&|c| ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negated)
                && go(t, s, ti + 1, si + 1, partial, failed)
        }
        Token::Star => {
            let mut j = si;
            loop {
                if go(t, s, ti + 1, j, partial, failed) {
                    break true;
                }
                if j < s.len() && s[j] != '/' {
                    j += 1;
                } else {
                    break false;
                }
            }
        }
        Token::AnyDirs => {
            go(t, s, ti + 1, si, partial, failed)
                || (si..s.len()).any(|j| s[j] == '/' && go(t, s, ti + 1, j + 1, partial, failed))
        }
        Token::AnyTail => true,
    };
    if !ok {
        failed[key] = true;
    }
    ok
}

/// What pack() wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packed {
    /// Regular files and symlinks in the archive (directories not counted).
    pub files: u64,
    /// Size of the tar stream.
    pub bytes: u64,
}

struct Entry {
    /// Relative to the context root.
    path: PathBuf,
    kind: Kind,
    mode: u32,
    mtime: u64,
}

enum Kind {
    Dir,
    File(u64),
    Symlink(PathBuf),
}

/// Writes `dir` as an uncompressed tar to `out`, honouring the ignore rules;
/// the Dockerfile (`dockerfile`, relative) and the ignore file itself are
/// always included even if a rule excludes them (as docker does).
///
/// Entries are in sorted order (reproducible) with relative paths: regular
/// files with their mode and mtime, directories, symlinks kept as symlinks
/// (not followed); sockets, fifos and devices are skipped. uid/gid 0. An
/// excluded directory that no `!` exception could reach into is not walked.
/// Fails before writing anything when the context clearly exceeds `limit`
/// bytes, and stops writing if the stream would.
pub fn pack(dir: &Path, dockerfile: &str, limit: u64, out: impl Write) -> anyhow::Result<Packed> {
    let rules = IgnoreRules::load(dir)?;
    let mut keep = vec![dockerfile.trim_start_matches("./").to_string()];
    keep.extend(rules.file.map(String::from));
    let mut entries = Vec::new();
    walk(dir, Path::new(""), &rules, &keep, &mut entries)?;

    let advice = rules.file.unwrap_or(".dockerignore");
    let too_big = |what: String| {
        anyhow::anyhow!(
            "build context is larger than {} ({what}); exclude files with {advice}",
            human(limit)
        )
    };
    // A lower bound (long names add blocks), so this never refuses a context that fits.
    let estimate: u64 = 1024
        + entries
            .iter()
            .map(|e| match e.kind {
                Kind::File(size) => 512 + size.div_ceil(512) * 512,
                _ => 512,
            })
            .sum::<u64>();
    if estimate > limit {
        return Err(too_big(format!(
            "at least {} in {} entries",
            human(estimate),
            entries.len()
        )));
    }

    let mut tar = tar::Builder::new(Counter {
        inner: out,
        written: 0,
        limit,
        over: false,
    });
    let mut files = 0;
    for e in &entries {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mode(e.mode);
        h.set_mtime(e.mtime);
        h.set_size(0);
        let res = match &e.kind {
            Kind::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                let mut name: OsString = e.path.clone().into();
                name.push("/");
                tar.append_data(&mut h, name, io::empty())
            }
            Kind::Symlink(target) => {
                files += 1;
                h.set_entry_type(tar::EntryType::Symlink);
                tar.append_link(&mut h, &e.path, target)
            }
            Kind::File(_) => {
                files += 1;
                let abs = dir.join(&e.path);
                let f = fs::File::open(&abs).with_context(|| format!("reading {}", abs.display()))?;
                // The size as opened, not as walked: the header must match the bytes sent.
                let size = f
                    .metadata()
                    .with_context(|| format!("reading {}", abs.display()))?
                    .len();
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(size);
                tar.append_data(
                    &mut h,
                    &e.path,
                    Exact {
                        inner: f.take(size),
                        left: size,
                    },
                )
            }
        };
        if let Err(err) = res {
            if tar.get_ref().over {
                return Err(too_big(format!("stopped at {}", e.path.display())));
            }
            return Err(err).with_context(|| format!("packing {}", dir.join(&e.path).display()));
        }
    }
    if let Err(err) = tar.finish() {
        if tar.get_ref().over {
            return Err(too_big("no room for the end of the archive".into()));
        }
        return Err(err).context("writing the build context");
    }
    let Counter { mut inner, written, .. } = tar.into_inner().context("writing the build context")?;
    inner.flush().context("writing the build context")?;
    Ok(Packed { files, bytes: written })
}

fn walk(root: &Path, rel: &Path, rules: &IgnoreRules, keep: &[String], out: &mut Vec<Entry>) -> anyhow::Result<()> {
    let abs = root.join(rel);
    let mut names = fs::read_dir(&abs)
        .and_then(|rd| rd.map(|e| e.map(|e| e.file_name())).collect::<io::Result<Vec<_>>>())
        .with_context(|| format!("reading {}", abs.display()))?;
    names.sort();
    for name in names {
        let path = rel.join(&name);
        let rel_str = path.to_string_lossy();
        let abs = root.join(&path);
        let meta = fs::symlink_metadata(&abs).with_context(|| format!("reading {}", abs.display()))?;
        let ft = meta.file_type();
        let excluded = !keep.iter().any(|k| *k == rel_str) && rules.excluded(&rel_str);
        let mode = meta.mode() & 0o7777;
        let mtime = meta.mtime().max(0) as u64;
        let kind = if ft.is_dir() {
            let dir_slash = format!("{rel_str}/");
            let descend =
                !excluded || rules.may_reinclude_below(&rel_str) || keep.iter().any(|k| k.starts_with(&dir_slash));
            if !excluded {
                out.push(Entry {
                    path: path.clone(),
                    kind: Kind::Dir,
                    mode,
                    mtime,
                });
            }
            if descend {
                walk(root, &path, rules, keep, out)?;
            }
            continue;
        } else if excluded {
            continue;
        } else if ft.is_file() {
            Kind::File(meta.len())
        } else if ft.is_symlink() {
            Kind::Symlink(fs::read_link(&abs).with_context(|| format!("reading {}", abs.display()))?)
        } else {
            // Sockets, fifos and devices: nothing a build could COPY.
            continue;
        };
        out.push(Entry {
            path,
            kind,
            mode,
            mtime,
        });
    }
    Ok(())
}

/// Counts what reaches `inner` and refuses to write past `limit`.
struct Counter<W> {
    inner: W,
    written: u64,
    limit: u64,
    over: bool,
}

impl<W: Write> Write for Counter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written + buf.len() as u64 > self.limit {
            self.over = true;
            return Err(io::Error::other("build context size limit reached"));
        }
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Reads exactly `left` bytes: a file that shrank while packing would
/// otherwise leave a header promising more data than follows.
struct Exact<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while packing",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// `512` -> `512 bytes`, `1536` -> `1.5 KiB`.
fn human(n: u64) -> String {
    const UNITS: &[&str] = &["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn rules(text: &str) -> IgnoreRules {
        let (r, errors) = parse_lines(text);
        assert!(errors.is_empty(), "{errors:?}");
        r
    }

    fn write(root: &Path, rel: &str, body: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, body).unwrap();
    }

    #[derive(Debug, PartialEq)]
    struct Seen {
        path: String,
        kind: char,
        link: Option<String>,
    }

    fn seen(path: &str, kind: char, link: Option<&str>) -> Seen {
        Seen {
            path: path.into(),
            kind,
            link: link.map(String::from),
        }
    }

    /// Packs `dir` and reads the archive back, checking what every entry shares.
    fn pack_and_list(dir: &Path, dockerfile: &str) -> (Packed, Vec<Seen>, Vec<u8>) {
        let mut buf = Vec::new();
        let packed = pack(dir, dockerfile, u64::MAX, &mut buf).unwrap();
        assert_eq!(packed.bytes, buf.len() as u64);
        let mut out = Vec::new();
        let mut archive = tar::Archive::new(&buf[..]);
        for e in archive.entries().unwrap() {
            let e = e.unwrap();
            let h = e.header();
            assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (0, 0));
            let kind = match h.entry_type() {
                tar::EntryType::Regular => 'f',
                tar::EntryType::Directory => 'd',
                tar::EntryType::Symlink => 'l',
                t => panic!("unexpected entry type {t:?}"),
            };
            out.push(Seen {
                path: String::from_utf8(e.path_bytes().to_vec()).unwrap(),
                kind,
                link: e.link_name().unwrap().map(|l| l.to_string_lossy().into_owned()),
            });
        }
        (packed, out, buf)
    }

    #[test]
    fn comments_blank_lines_and_whitespace() {
        let r = rules("# a comment\n\n   \n  *.log  \r\n \\#literal\n");
        assert!(!r.excluded("# a comment"));
        assert!(r.excluded("a.log"));
        assert!(r.excluded("#literal"));
        // Only a '#' in the first column starts a comment, as in docker.
        let r = rules(" #x\n");
        assert!(r.excluded("#x"));
        assert_eq!(IgnoreRules::parse("# only\n\n").patterns.len(), 0);
        assert!(!IgnoreRules::default().excluded("anything"));
    }

    #[test]
    fn star_stays_in_one_directory() {
        let r = rules("*.log");
        assert!(r.excluded("a.log"));
        assert!(r.excluded(".log"));
        assert!(!r.excluded("a.log.gz"));
        // Docker's `*.log` is the root only.
        assert!(!r.excluded("dir/a.log"));
        let r = rules("*/*.log");
        assert!(r.excluded("dir/a.log"));
        assert!(!r.excluded("a/b/c.log"));
    }

    #[test]
    fn double_star_spans_directories() {
        let r = rules("**/*.tmp");
        assert!(r.excluded("a.tmp"));
        assert!(r.excluded("x/y/z/a.tmp"));
        assert!(!r.excluded("a.tmpx"));
        let r = rules("a/**/b");
        assert!(r.excluded("a/b"));
        assert!(r.excluded("a/x/y/b"));
        assert!(!r.excluded("a/xb"));
        let r = rules("a/**");
        assert!(r.excluded("a/x/y"));
        assert!(!r.excluded("a"));
        let r = rules("**");
        assert!(r.excluded("anything/at/all"));
        let r = rules("**/node_modules");
        assert!(r.excluded("node_modules/x.js"));
        assert!(r.excluded("web/app/node_modules/y/z.js"));
        assert!(!r.excluded("web/node_modules_old"));
    }

    #[test]
    fn exceptions_and_last_match_wins() {
        let r = rules("*.log\n!keep.log");
        assert!(r.excluded("other.log"));
        assert!(!r.excluded("keep.log"));
        // Order matters: the later rule re-excludes.
        let r = rules("!keep.log\n*.log");
        assert!(r.excluded("keep.log"));
        let r = rules("*.md\n!README*.md\nREADME-secret.md");
        assert!(r.excluded("CHANGES.md"));
        assert!(!r.excluded("README.md"));
        assert!(!r.excluded("README-dev.md"));
        assert!(r.excluded("README-secret.md"));
        // Everything but src/, re-included through its parent.
        let r = rules("*\n!src");
        assert!(r.excluded("docs/a.md"));
        assert!(!r.excluded("src/main.rs"));
    }

    #[test]
    fn a_directory_pattern_excludes_what_is_under_it() {
        let r = rules("node_modules");
        assert!(r.excluded("node_modules"));
        assert!(r.excluded("node_modules/a/b.js"));
        assert!(!r.excluded("src/node_modules/a.js"));
        assert!(!r.excluded("node_modules2"));
        let r = rules("node_modules\n!node_modules/keep.js");
        assert!(r.excluded("node_modules/a.js"));
        assert!(!r.excluded("node_modules/keep.js"));
        let r = rules("build/\n");
        assert!(r.excluded("build/out/x.o"));
    }

    #[test]
    fn patterns_are_cleaned_and_leading_slash_dropped() {
        let r = rules("/leading\n./dot/\na//b/./c/\nx/../y\n");
        assert!(r.excluded("leading"));
        assert!(r.excluded("leading/x"));
        assert!(r.excluded("dot/file"));
        assert!(r.excluded("a/b/c/d"));
        assert!(r.excluded("y"));
        assert!(!r.excluded("x"));
        assert_eq!(clean("a/../../b"), "../b");
        assert_eq!(clean("/../a/"), "/a");
        assert_eq!(clean("./"), ".");
    }

    #[test]
    fn dir_star_is_not_the_dir() {
        let r = rules("dir/*");
        assert!(!r.excluded("dir"));
        assert!(r.excluded("dir/a"));
        assert!(r.excluded("dir/a/b"));
        let r = rules("dir");
        assert!(r.excluded("dir"));
        assert!(r.excluded("dir/a"));
    }

    #[test]
    fn question_mark_classes_and_escapes() {
        let r = rules("file?.txt");
        assert!(r.excluded("file1.txt"));
        assert!(!r.excluded("file10.txt"));
        assert!(!r.excluded("file.txt"));
        assert!(!rules("a?b").excluded("a/b"));
        let r = rules("[a-c].txt");
        assert!(r.excluded("b.txt"));
        assert!(!r.excluded("d.txt"));
        for neg in ["[^a-c].txt", "[!a-c].txt"] {
            let r = rules(neg);
            assert!(r.excluded("d.txt"), "{neg}");
            assert!(!r.excluded("a.txt"), "{neg}");
        }
        let r = rules("[xy0-9]z");
        assert!(r.excluded("5z"));
        assert!(r.excluded("yz"));
        assert!(!r.excluded("az"));
        let r = rules("\\*.txt\nlit\\[1\\]");
        assert!(r.excluded("*.txt"));
        assert!(!r.excluded("a.txt"));
        assert!(r.excluded("lit[1]"));
        let r = rules("[\\]]x");
        assert!(r.excluded("]x"));
    }

    #[test]
    fn malformed_patterns_fail_load_and_are_dropped_by_parse() {
        let r = IgnoreRules::parse("[abc\n*.log\n!\nend\\");
        assert_eq!(r.patterns.len(), 1);
        assert!(r.excluded("a.log"));

        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), ".dockerignore", "ok\n[abc\n");
        let err = IgnoreRules::load(tmp.path()).unwrap_err().to_string();
        assert!(err.contains(".dockerignore line 2"), "{err}");
        assert!(err.contains("[abc"), "{err}");
    }

    #[test]
    fn load_prefers_containerignore() {
        let tmp = tempfile::tempdir().unwrap();
        let none = IgnoreRules::load(tmp.path()).unwrap();
        assert_eq!(none.file(), None);
        assert!(!none.excluded("a.txt"));
        write(tmp.path(), ".dockerignore", "b.txt\n");
        let d = IgnoreRules::load(tmp.path()).unwrap();
        assert_eq!(d.file(), Some(".dockerignore"));
        assert!(d.excluded("b.txt"));
        write(tmp.path(), ".containerignore", "a.txt\n");
        let c = IgnoreRules::load(tmp.path()).unwrap();
        assert_eq!(c.file(), Some(".containerignore"));
        assert!(c.excluded("a.txt"));
        assert!(!c.excluded("b.txt"));
    }

    #[test]
    fn exceptions_that_could_reach_into_a_directory() {
        let r = rules("*\n!src/*.rs\n!a/b/c\n!**/keep");
        assert!(r.may_reinclude_below("src"));
        assert!(r.may_reinclude_below("a"));
        assert!(r.may_reinclude_below("a/b"));
        // Only via `!**/keep`, which reaches anywhere.
        assert!(r.may_reinclude_below("docs"));
        let r = rules("*\n!src/*.rs\n!a/b/c");
        assert!(!r.may_reinclude_below("docs"));
        assert!(!r.may_reinclude_below("a/c"));
        assert!(!r.may_reinclude_below("src/sub"));
        // `!a/b/c` names a/b/c itself, nothing below it.
        assert!(!r.may_reinclude_below("a/b/c"));
        assert!(!rules("node_modules").may_reinclude_below("node_modules"));
    }

    #[test]
    fn pack_writes_sorted_entries_honouring_the_rules() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        write(d, "Dockerfile", "FROM scratch\n");
        write(
            d,
            ".dockerignore",
            "*.log\nDockerfile\n.dockerignore\nsecret\n!secret/public.txt\nnode_modules\n",
        );
        write(d, "app/main.rs", "fn main() {}\n");
        write(d, "app/debug.log", "kept: *.log is the root only\n");
        write(d, "root.log", "excluded\n");
        write(d, "secret/key", "excluded\n");
        write(d, "secret/public.txt", "re-included\n");
        write(d, "node_modules/a/b.js", "excluded\n");
        write(d, "run.sh", "#!/bin/sh\n");
        fs::set_permissions(d.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        symlink("app/main.rs", d.join("link")).unwrap();
        symlink("/nowhere/at/all", d.join("dangling")).unwrap();
        let _sock = std::os::unix::net::UnixListener::bind(d.join("sock")).unwrap();

        let (packed, list, buf) = pack_and_list(d, "Dockerfile");
        assert_eq!(
            list,
            vec![
                seen(".dockerignore", 'f', None),
                seen("Dockerfile", 'f', None),
                seen("app/", 'd', None),
                seen("app/debug.log", 'f', None),
                seen("app/main.rs", 'f', None),
                seen("dangling", 'l', Some("/nowhere/at/all")),
                seen("link", 'l', Some("app/main.rs")),
                seen("run.sh", 'f', None),
                seen("secret/public.txt", 'f', None),
            ]
        );
        assert_eq!(packed.files, 8);

        let mut archive = tar::Archive::new(&buf[..]);
        for e in archive.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().into_owned();
            let meta = fs::symlink_metadata(d.join(&path)).unwrap();
            assert_eq!(e.header().mtime().unwrap(), meta.mtime() as u64, "{path:?}");
            if path == Path::new("run.sh") {
                assert_eq!(e.header().mode().unwrap(), 0o755);
            }
            if path == Path::new("app/main.rs") {
                let mut body = String::new();
                e.read_to_string(&mut body).unwrap();
                assert_eq!(body, "fn main() {}\n");
                assert_eq!(e.header().mode().unwrap(), meta.mode() & 0o7777);
            }
        }

        // Same tree, same bytes.
        let (_, _, again) = pack_and_list(d, "Dockerfile");
        assert_eq!(buf, again);
    }

    #[test]
    fn pack_keeps_a_nested_dockerfile_in_an_excluded_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        write(d, "sub/Build.df", "FROM scratch\n");
        write(d, "sub/other", "x\n");
        write(d, ".containerignore", "sub\n");
        write(d, ".dockerignore", "not in use\n");
        let (packed, list, _) = pack_and_list(d, "sub/Build.df");
        assert_eq!(
            list,
            vec![
                seen(".containerignore", 'f', None),
                seen(".dockerignore", 'f', None),
                seen("sub/Build.df", 'f', None),
            ]
        );
        assert_eq!(packed.files, 3);
    }

    #[test]
    fn pack_does_not_walk_an_excluded_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        write(d, "Dockerfile", "FROM scratch\n");
        // A tree deeper than PATH_MAX, built by short renames: walking into it fails.
        let mut inner: Option<PathBuf> = None;
        for i in 0..20 {
            let level = d.join(format!("{i:02}{}", "x".repeat(250)));
            fs::create_dir(&level).unwrap();
            if let Some(prev) = inner.take() {
                fs::rename(&prev, level.join(prev.file_name().unwrap())).unwrap();
            }
            inner = Some(level);
        }
        fs::rename(inner.unwrap(), d.join("node_modules")).unwrap();
        let err = pack(d, "Dockerfile", u64::MAX, io::sink()).unwrap_err();
        assert!(format!("{err:#}").contains("File name too long"), "{err:#}");

        write(d, ".dockerignore", "node_modules\n!src\n");
        let (_, list, _) = pack_and_list(d, "Dockerfile");
        let names: Vec<&str> = list.iter().map(|s| s.path.as_str()).collect();
        assert_eq!(names, [".dockerignore", "Dockerfile"]);
    }

    #[test]
    fn pack_uses_containerignore_over_dockerignore() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        write(d, "Containerfile", "FROM scratch\n");
        write(d, ".containerignore", "a.txt\n.containerignore\n");
        write(d, ".dockerignore", "b.txt\n");
        write(d, "a.txt", "a\n");
        write(d, "b.txt", "b\n");
        let (_, list, _) = pack_and_list(d, "Containerfile");
        let names: Vec<&str> = list.iter().map(|s| s.path.as_str()).collect();
        assert_eq!(names, [".containerignore", ".dockerignore", "Containerfile", "b.txt"]);
    }

    #[test]
    fn pack_handles_long_names() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let long = format!("{}/{}.txt", "d".repeat(80), "f".repeat(90));
        write(d, &long, "deep\n");
        symlink(&long, d.join("l")).unwrap();
        let (_, list, _) = pack_and_list(d, "Dockerfile");
        assert_eq!(
            list,
            vec![
                seen(&format!("{}/", "d".repeat(80)), 'd', None),
                seen(&long, 'f', None),
                seen("l", 'l', Some(&long)),
            ]
        );
    }

    #[test]
    fn pack_refuses_a_context_over_the_limit() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        write(d, "Dockerfile", "FROM scratch\n");
        write(d, "big.bin", &"x".repeat(10 * 1024));
        let mut buf = Vec::new();
        let err = pack(d, "Dockerfile", 4096, &mut buf).unwrap_err().to_string();
        assert!(err.starts_with("build context is larger than 4.0 KiB ("), "{err}");
        assert!(err.ends_with("; exclude files with .dockerignore"), "{err}");
        // Refused before anything was sent.
        assert!(buf.is_empty());

        // Long names make the stream 2 KiB bigger than the estimate: the writer catches that.
        write(d, &format!("{}.txt", "m".repeat(120)), "x\n");
        write(d, &format!("{}.txt", "n".repeat(120)), "x\n");
        let (packed, _, _) = pack_and_list(d, "Dockerfile");
        let mut exact = Vec::new();
        assert_eq!(pack(d, "Dockerfile", packed.bytes, &mut exact).unwrap(), packed);
        let err = pack(d, "Dockerfile", packed.bytes - 1, io::sink())
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!(
                "build context is larger than {} (no room for the end of the archive); exclude files with .dockerignore",
                human(packed.bytes - 1)
            )
        );
        let err = pack(d, "Dockerfile", packed.bytes - 1025, io::sink())
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("(stopped at {}.txt)", "n".repeat(120))), "{err}");
    }

    #[test]
    fn find_dockerfile_defaults_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let err = find_dockerfile(d, None).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "no Dockerfile in {}: looked for Containerfile, Dockerfile; name one with --dockerfile",
                d.display()
            )
        );
        write(d, "Dockerfile", "FROM scratch\n");
        assert_eq!(find_dockerfile(d, None).unwrap(), "Dockerfile");
        write(d, "Containerfile", "FROM scratch\n");
        assert_eq!(find_dockerfile(d, None).unwrap(), "Containerfile");
    }

    #[test]
    fn find_dockerfile_checks_the_context_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("missing");
        let err = find_dockerfile(&missing, None).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("build context {}: not a directory", missing.display())),
            "{err}"
        );
        write(tmp.path(), "file", "x");
        let err = find_dockerfile(&tmp.path().join("file"), None).unwrap_err().to_string();
        assert!(err.ends_with("file: not a directory"), "{err}");
    }

    #[test]
    fn find_dockerfile_explicit() {
        let tmp = tempfile::tempdir().unwrap();
        let ctx = tmp.path().join("ctx");
        write(&ctx, "sub/Build.df", "FROM scratch\n");
        write(tmp.path(), "Outside.df", "FROM scratch\n");

        let nested = ctx.join("sub/Build.df");
        assert_eq!(find_dockerfile(&ctx, Some(&nested)).unwrap(), "sub/Build.df");

        // As typed relative to the current directory: climb to / and back down.
        let cwd = std::env::current_dir().unwrap();
        let mut rel = PathBuf::new();
        for _ in 0..=cwd.components().count() {
            rel.push("..");
        }
        let rel = rel.join(nested.strip_prefix("/").unwrap());
        assert!(rel.is_relative());
        assert_eq!(find_dockerfile(&ctx, Some(&rel)).unwrap(), "sub/Build.df");

        let missing = ctx.join("nope.df");
        let err = find_dockerfile(&ctx, Some(&missing)).unwrap_err().to_string();
        assert_eq!(err, format!("--dockerfile {}: no such file", missing.display()));

        let outside = tmp.path().join("Outside.df");
        let err = find_dockerfile(&ctx, Some(&outside)).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "--dockerfile {} is outside the build context {}",
                outside.display(),
                ctx.display()
            )
        );

        // A link inside pointing out is outside too: the builder could not read it.
        symlink(&outside, ctx.join("Dockerfile")).unwrap();
        let err = find_dockerfile(&ctx, None).unwrap_err().to_string();
        assert!(err.contains("outside the build context"), "{err}");
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 bytes");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(100 * 1024 * 1024), "100.0 MiB");
        assert_eq!(human(3 << 30), "3.0 GiB");
    }
}
