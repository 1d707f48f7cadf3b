//! The external witness file: the checkpoints the service appended to it
//! (JSON Lines), read up to the length the file had when verification
//! started and streamed in ascending tree size ([`Witness`]).

use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::Path;

use crate::checkpoint::Checkpoint;
use crate::export::{self, ExportReader, LineError, ReadError, Record};

/// The witness file could not be read (not a verdict on the trail).
#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    #[error("cannot read the witness file: {0}")]
    Io(#[source] io::Error),
    #[error("witness file, {0}")]
    Line(ReadError),
}

type CheckpointIter = Box<dyn Iterator<Item = Result<Checkpoint, WitnessError>> + Send>;

/// The checkpoints of the external witness file (JSON Lines of checkpoint
/// records, as the service appends them), in ascending tree size.
pub struct Witness {
    source: CheckpointIter,
    peeked: Option<Checkpoint>,
    count: u64,
}

impl fmt::Debug for Witness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Witness")
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl Witness {
    /// Open a witness file. Only the bytes present now are read (the
    /// service may be appending). A first pass checks every line and the
    /// order; a file in ascending order is then streamed, any other is
    /// read into memory and sorted.
    pub fn open(path: &Path) -> Result<Self, WitnessError> {
        let file = File::open(path).map_err(WitnessError::Io)?;
        let len = file.metadata().map_err(WitnessError::Io)?.len();
        let mut count = 0u64;
        let mut sorted = true;
        let mut last = 0u64;
        for record in ExportReader::new(BufReader::new(file.take(len))) {
            match record.map_err(WitnessError::Line)? {
                Record::Checkpoint(c) => {
                    sorted &= c.tree_size >= last;
                    last = last.max(c.tree_size);
                    count += 1;
                }
                Record::Entry(_) | Record::Anchor(_) => {
                    return Err(WitnessError::Line(ReadError {
                        line: count + 1,
                        error: LineError::UnexpectedEntry,
                    }))
                }
            }
        }
        let file = File::open(path).map_err(WitnessError::Io)?;
        let input = BufReader::new(file.take(len));
        if sorted {
            let lines = ExportReader::new(input).map(|record| match record {
                Ok(Record::Checkpoint(c)) => Ok(c),
                Ok(Record::Entry(_) | Record::Anchor(_)) => Err(WitnessError::Line(ReadError {
                    line: 0,
                    error: LineError::UnexpectedEntry,
                })),
                Err(e) => Err(WitnessError::Line(e)),
            });
            Ok(Self {
                source: Box::new(lines),
                peeked: None,
                count,
            })
        } else {
            let checkpoints = export::read_checkpoints(input).map_err(WitnessError::Line)?;
            Ok(Self::from_checkpoints(checkpoints))
        }
    }

    /// A witness from checkpoints already read (any order).
    pub fn from_checkpoints(mut checkpoints: Vec<Checkpoint>) -> Self {
        checkpoints.sort_by_key(|c| c.tree_size);
        let count = checkpoints.len() as u64;
        Self {
            source: Box::new(checkpoints.into_iter().map(Ok)),
            peeked: None,
            count,
        }
    }

    /// Number of checkpoint lines.
    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub(super) fn peek_size(&mut self) -> Result<Option<u64>, WitnessError> {
        if self.peeked.is_none() {
            self.peeked = self.source.next().transpose()?;
        }
        Ok(self.peeked.as_ref().map(|c| c.tree_size))
    }

    pub(super) fn next_checkpoint(&mut self) -> Result<Option<Checkpoint>, WitnessError> {
        match self.peeked.take() {
            Some(c) => Ok(Some(c)),
            None => self.source.next().transpose(),
        }
    }

    /// Every checkpoint, in ascending tree size.
    pub fn into_vec(mut self) -> Result<Vec<Checkpoint>, WitnessError> {
        let mut out = Vec::new();
        while let Some(c) = self.next_checkpoint()? {
            out.push(c);
        }
        Ok(out)
    }
}
