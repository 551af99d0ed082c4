//! Errors with 1-based line/column positions.

/// What kind of problem a [`PolicyError`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The text is not valid HuJSON.
    Syntax,
    /// Valid HuJSON, but not a valid policy (unknown group, bad port, ...).
    Semantic,
}

/// A policy that could not be parsed or validated.
///
/// `line` and `column` are 1-based; the column counts Unicode scalar values
/// (not bytes), the same convention jsonc-parser uses for syntax errors. For
/// semantic errors the position is the first character (usually the opening
/// quote) of the offending string, key or value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy error at line {line}, column {column}: {reason}")]
pub struct PolicyError {
    pub line: usize,
    pub column: usize,
    pub reason: String,
    pub kind: ErrorKind,
}

impl PolicyError {
    /// Build a semantic error pointing at byte offset `offset` of `text`.
    pub(crate) fn at(text: &str, offset: usize, reason: impl Into<String>) -> Self {
        let (line, column) = line_col(text, offset);
        PolicyError {
            line,
            column,
            reason: reason.into(),
            kind: ErrorKind::Semantic,
        }
    }
}

/// 1-based (line, column) of byte `offset`. Mirrors jsonc-parser: `\n`, and a
/// lone `\r`, end a line; columns count chars. Never panics: an offset past
/// the end or inside a UTF-8 sequence is clamped down.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let bytes = text.as_bytes();
    let (mut line, mut col) = (1usize, 1usize);
    for (i, c) in text[..end].char_indices() {
        if c == '\n' || (c == '\r' && bytes.get(i + 1) != Some(&b'\n')) {
            line += 1;
            col = 1;
        } else {
            col += 1;
        }
    }
    (line, col)
}
