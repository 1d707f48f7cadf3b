//! JSON Lines export of the audit trail: one record per line, each either an
//! entry or a checkpoint, told apart by a leading `type` field.
//!
//! ```text
//! {"type":"checkpoint","tree_size":50,"root":"..","chain_head":"..","time":"..","key_id":"..","signature":".."}
//! {"type":"entry","seq":1,"event":{"time":"..","principal":..,..},"leaf_hash":"..","chain_hash":".."}
//! ```
//!
//! Layout written by [`write_export`]: for an export that does not start at
//! entry 1 (an archived segment, a range), first an anchor line with the
//! trail's state before its first entry (see [`Anchor`]); then all
//! checkpoints (ascending tree size), then the entries in seq order, every
//! line ending in `\n`.
//!
//! ```text
//! {"type":"anchor","tree_size":5000,"chain_head":"..","frontier":["..",".."]}
//! ```
//! The
//! verifier also accepts a checkpoint anywhere before the entry that follows
//! its tree size (e.g. right after the entry it covers up to), so a trail
//! can be streamed in one pass; a file of checkpoint lines only is the
//! external witness.
//!
//! Reading is strict: every line must be exactly what the exporter writes
//! for the record it holds (same field order, no spaces, lowercase hex,
//! canonical RFC 3339 times, `\n`-terminated). A line that parses but is
//! spelled differently is refused, so any edit to a line either makes it
//! unreadable or changes a value that the hashes or signatures cover.

use std::io::{self, BufRead, Read, Write};

use crate::chain::{Anchor, ChainedEvent};
use crate::checkpoint::Checkpoint;

const ENTRY_PREFIX: &str = r#"{"type":"entry","#;
/// Longest line read (an entry is well under 4 KiB; the API bounds every
/// field), so a damaged file cannot make the reader hold gigabytes.
pub const MAX_LINE: usize = 1 << 20;
const CHECKPOINT_PREFIX: &str = r#"{"type":"checkpoint","#;
const ANCHOR_PREFIX: &str = r#"{"type":"anchor","#;

/// One line of an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Entry(ChainedEvent),
    Checkpoint(Checkpoint),
    /// Where the export starts (its first line, when present).
    Anchor(Anchor),
}

impl Record {
    /// The line for this record, without the newline.
    pub fn to_line(&self) -> Result<String, ExportError> {
        match self {
            Record::Entry(e) => entry_line(e),
            Record::Checkpoint(c) => checkpoint_line(c),
            Record::Anchor(a) => tagged(ANCHOR_PREFIX, a),
        }
    }

    /// Parse one line (without its newline), strictly.
    pub fn from_line(line: &str) -> Result<Self, LineError> {
        let record = if let Some(rest) = line.strip_prefix(ENTRY_PREFIX) {
            Record::Entry(parse_body(rest)?)
        } else if let Some(rest) = line.strip_prefix(CHECKPOINT_PREFIX) {
            Record::Checkpoint(parse_body(rest)?)
        } else if let Some(rest) = line.strip_prefix(ANCHOR_PREFIX) {
            Record::Anchor(parse_body(rest)?)
        } else {
            return Err(LineError::UnknownType);
        };
        // Times are written in UTC (`Z`): another offset for the same
        // instant writes back to itself, but it is not what the exporter
        // wrote, so it is refused like any other respelling.
        let utc = match &record {
            Record::Entry(e) => e.event.time.offset().is_utc(),
            Record::Checkpoint(c) => c.time.offset().is_utc(),
            Record::Anchor(_) => true,
        };
        if !utc {
            return Err(LineError::NotCanonical);
        }
        // Canonical form: writing it back must give the same line.
        match record.to_line() {
            Ok(again) if again == line => Ok(record),
            _ => Err(LineError::NotCanonical),
        }
    }
}

fn parse_body<T: serde::de::DeserializeOwned>(rest: &str) -> Result<T, LineError> {
    let body = format!("{{{rest}");
    serde_json::from_str(&body).map_err(|e| {
        let column = e.column();
        match e.classify() {
            serde_json::error::Category::Data => LineError::Invalid { column },
            _ => LineError::Syntax { column },
        }
    })
}

fn tagged<T: serde::Serialize>(prefix: &str, value: &T) -> Result<String, ExportError> {
    let json = serde_json::to_string(value).map_err(|_| ExportError::Unrepresentable)?;
    // A struct with fields serializes as `{"first":...}`: splice the tag in.
    let body = json.strip_prefix('{').ok_or(ExportError::Unrepresentable)?;
    Ok(format!("{prefix}{body}"))
}

/// The export line of an entry (without newline).
pub fn entry_line(entry: &ChainedEvent) -> Result<String, ExportError> {
    tagged(ENTRY_PREFIX, entry)
}

/// The export line of a checkpoint (without newline).
pub fn checkpoint_line(checkpoint: &Checkpoint) -> Result<String, ExportError> {
    tagged(CHECKPOINT_PREFIX, checkpoint)
}

/// Write one entry line.
pub fn write_entry<W: Write>(out: &mut W, entry: &ChainedEvent) -> Result<(), ExportError> {
    let mut line = entry_line(entry)?;
    line.push('\n');
    out.write_all(line.as_bytes()).map_err(ExportError::Io)
}

/// Write one checkpoint line (also the format of the external witness file).
pub fn write_checkpoint<W: Write>(out: &mut W, checkpoint: &Checkpoint) -> Result<(), ExportError> {
    let mut line = checkpoint_line(checkpoint)?;
    line.push('\n');
    out.write_all(line.as_bytes()).map_err(ExportError::Io)
}

/// Write the anchor line (the first line of an export that does not start
/// at entry 1).
pub fn write_anchor<W: Write>(out: &mut W, anchor: &Anchor) -> Result<(), ExportError> {
    let mut line = Record::Anchor(anchor.clone()).to_line()?;
    line.push('\n');
    out.write_all(line.as_bytes()).map_err(ExportError::Io)
}

/// Write a whole export: the anchor (unless it is the genesis), checkpoints
/// (sorted by tree size), then entries.
pub fn write_export<'a, W, C, E>(
    out: &mut W,
    anchor: &Anchor,
    checkpoints: C,
    entries: E,
) -> Result<(), ExportError>
where
    W: Write,
    C: IntoIterator<Item = &'a Checkpoint>,
    E: IntoIterator,
    E::Item: std::borrow::Borrow<ChainedEvent>,
{
    use std::borrow::Borrow;
    if anchor.tree_size > 0 {
        write_anchor(out, anchor)?;
    }
    let mut checkpoints: Vec<&Checkpoint> = checkpoints.into_iter().collect();
    checkpoints.sort_by_key(|c| c.tree_size);
    for c in checkpoints {
        write_checkpoint(out, c)?;
    }
    for e in entries {
        write_entry(out, e.borrow())?;
    }
    Ok(())
}

/// Reads an export (or a witness file) line by line, in constant memory per
/// line. Stops after the first error.
#[derive(Debug)]
pub struct ExportReader<R> {
    input: R,
    line: u64,
    buf: Vec<u8>,
    done: bool,
}

impl<R: BufRead> ExportReader<R> {
    pub fn new(input: R) -> Self {
        Self {
            input,
            line: 0,
            buf: Vec::with_capacity(1024),
            done: false,
        }
    }

    /// Number of the last line read (1-based).
    pub fn line(&self) -> u64 {
        self.line
    }

    fn read_one(&mut self) -> Option<Result<Record, LineError>> {
        self.buf.clear();
        let mut limited = (&mut self.input).take(MAX_LINE as u64 + 1);
        match limited.read_until(b'\n', &mut self.buf) {
            Ok(0) => return None,
            Ok(_) => {}
            Err(e) => {
                self.line += 1;
                return Some(Err(LineError::Io(e.kind())));
            }
        }
        self.line += 1;
        if self.buf.len() > MAX_LINE {
            return Some(Err(LineError::TooLong));
        }
        if self.buf.pop() != Some(b'\n') {
            return Some(Err(LineError::Unterminated));
        }
        let Ok(text) = std::str::from_utf8(&self.buf) else {
            return Some(Err(LineError::NotUtf8));
        };
        Some(Record::from_line(text))
    }
}

impl<R: BufRead> Iterator for ExportReader<R> {
    type Item = Result<Record, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let item = self.read_one()?;
        if item.is_err() {
            self.done = true;
        }
        Some(item.map_err(|error| ReadError {
            line: self.line,
            error,
        }))
    }
}

/// Read a witness file: checkpoint lines only.
pub fn read_checkpoints<R: BufRead>(input: R) -> Result<Vec<Checkpoint>, ReadError> {
    let mut reader = ExportReader::new(input);
    let mut out = Vec::new();
    while let Some(record) = reader.next() {
        match record? {
            Record::Checkpoint(c) => out.push(c),
            Record::Entry(_) | Record::Anchor(_) => {
                return Err(ReadError {
                    line: reader.line(),
                    error: LineError::UnexpectedEntry,
                })
            }
        }
    }
    Ok(out)
}

/// What is wrong with a line. Never quotes the line's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("cannot read the file ({0})")]
    Io(io::ErrorKind),
    #[error("the last line does not end with a newline (cut short?)")]
    Unterminated,
    #[error("longer than any record (over 1 MiB)")]
    TooLong,
    #[error("not UTF-8")]
    NotUtf8,
    #[error(r#"not a record: lines start with {{"type":"entry", {{"type":"checkpoint", or {{"type":"anchor","#)]
    UnknownType,
    #[error("not valid JSON (near column {column} of the record body)")]
    Syntax { column: usize },
    #[error("a field is missing, unknown or has a value of the wrong form (near column {column} of the record body)")]
    Invalid { column: usize },
    #[error("not written the way the exporter writes it (spacing, field order, hex case or time format differ)")]
    NotCanonical,
    #[error("an entry or anchor in a file that should hold checkpoints only")]
    UnexpectedEntry,
}

/// A [`LineError`] with its line number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {error}")]
pub struct ReadError {
    pub line: u64,
    pub error: LineError,
}

/// Why an export could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot write the export: {0}")]
    Io(#[source] io::Error),
    #[error(
        "a time cannot be written as RFC 3339 (year outside 0000-9999 or an offset with seconds)"
    )]
    Unrepresentable,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::chain::ChainState;
    use crate::checkpoint::SigningKey;
    use crate::{Action, AuditEvent, Outcome};

    #[test]
    fn times_in_another_offset_are_not_canonical() {
        let (checkpoints, entries) = sample();
        let plus_one = time::UtcOffset::from_hms(1, 0, 0).unwrap();
        let mut entry = entries[0].clone();
        entry.event.time = entry.event.time.to_offset(plus_one);
        let line = entry_line(&entry).unwrap();
        assert!(line.contains("+01:00"), "{line}");
        assert_eq!(Record::from_line(&line), Err(LineError::NotCanonical));
        let mut cp = checkpoints[0].clone();
        cp.time = cp.time.to_offset(plus_one);
        let line = checkpoint_line(&cp).unwrap();
        assert_eq!(Record::from_line(&line), Err(LineError::NotCanonical));
        // The originals read back.
        let line = entry_line(&entries[0]).unwrap();
        assert_eq!(
            Record::from_line(&line),
            Ok(Record::Entry(entries[0].clone()))
        );
    }

    fn sample() -> (Vec<Checkpoint>, Vec<ChainedEvent>) {
        let mut chain = ChainState::new();
        let entries: Vec<_> = (0..3)
            .map(|i| {
                chain.append(
                    AuditEvent::new(Action::Tokenize, Outcome::Success)
                        .tenant("t")
                        .token(format!("tok_{i}"))
                        .reason("quote \" backslash \\ tab \t é"),
                )
            })
            .collect();
        let key = SigningKey::generate().unwrap();
        let cp = key.sign_checkpoint(3, [1; 32], chain.head, time::OffsetDateTime::now_utc());
        (vec![cp], entries)
    }

    #[test]
    fn round_trip() {
        let (cps, entries) = sample();
        let mut out = Vec::new();
        write_export(&mut out, &crate::chain::Anchor::genesis(), &cps, &entries).unwrap();
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(text.starts_with(r#"{"type":"checkpoint","tree_size":3,"#));
        assert_eq!(text.lines().count(), 4);
        let records: Vec<Record> = ExportReader::new(&out[..]).map(|r| r.unwrap()).collect();
        assert_eq!(records[0], Record::Checkpoint(cps[0].clone()));
        for (r, e) in records[1..].iter().zip(&entries) {
            assert_eq!(*r, Record::Entry(e.clone()));
        }
        let witness = checkpoint_line(&cps[0]).unwrap() + "\n";
        assert_eq!(read_checkpoints(witness.as_bytes()).unwrap(), cps);
        let err = read_checkpoints(&out[..]).unwrap_err();
        assert_eq!(err.line, 2);
        assert_eq!(err.error, LineError::UnexpectedEntry);
    }

    #[test]
    fn strict_reading() {
        let (_, entries) = sample();
        let line = entry_line(&entries[0]).unwrap();
        let spaced = line.replacen(r#""seq":1"#, r#""seq": 1"#, 1);
        let upper = line.replacen(
            &crate::hex::encode(&entries[0].leaf_hash),
            &crate::hex::encode(&entries[0].leaf_hash).to_uppercase(),
            1,
        );
        let cases = [
            (spaced.as_str(), LineError::NotCanonical),
            (upper.as_str(), LineError::Invalid { column: 0 }),
            ("", LineError::UnknownType),
            (r#"{"type":"other","seq":1}"#, LineError::UnknownType),
            (
                r#"{"type":"entry","seq":1"#,
                LineError::Syntax { column: 0 },
            ),
        ];
        for (text, expected) in cases {
            let got = Record::from_line(text).unwrap_err();
            let same_kind = std::mem::discriminant(&got) == std::mem::discriminant(&expected);
            assert!(same_kind, "{text}: {got:?}");
        }
        let unterminated = line.clone();
        let mut reader = ExportReader::new(unterminated.as_bytes());
        assert_eq!(
            reader.next().unwrap().unwrap_err().error,
            LineError::Unterminated
        );
        assert!(reader.next().is_none(), "stops after an error");
        let mut long = vec![b'x'; MAX_LINE + 10];
        long.push(b'\n');
        let err = ExportReader::new(&long[..]).next().unwrap().unwrap_err();
        assert_eq!(err.error, LineError::TooLong);
        let mut bad_utf8 = line.into_bytes();
        bad_utf8[40] = 0xff;
        bad_utf8.push(b'\n');
        let err = ExportReader::new(&bad_utf8[..])
            .next()
            .unwrap()
            .unwrap_err();
        assert_eq!(
            err,
            ReadError {
                line: 1,
                error: LineError::NotUtf8
            }
        );
    }
}
