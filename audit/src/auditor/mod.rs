//! What `vault-audit` does, as functions over the library: verify a trail
//! read from the service's database (or an export) together with the
//! external witness file, export it, build and check inclusion proofs.
//!
//! Nothing here re-implements the cryptography: entries and checkpoints go
//! through [`Verifier`], exports through [`crate::export`], proofs through
//! [`EntryProof`]. What this module adds is the plumbing, and one check the
//! library cannot make on its own: every checkpoint of the witness file must
//! also be in the database, unchanged (else checkpoints were removed or
//! rewritten there).
//!
//! Reading the database while the service writes is safe: checkpoints are
//! queried before entries (a checkpoint is committed after the entries it
//! covers, so every checkpoint seen has its entries visible), and the
//! witness file is read only up to its length when verification starts.
//!
//! Memory: from the database, entries and checkpoints are streamed and
//! merged in one pass, and a witness file whose checkpoints come in
//! ascending tree size (what the service writes) is streamed too, so memory
//! does not grow with the trail. Exports hold their checkpoints in memory
//! (the library's export verifier reads them all first).
//!
//! The parts, one file each:
//! - `witness`: [`Witness`], the external witness file's checkpoints,
//!   streamed in ascending tree size;
//! - `verify_trail`: [`verify_database`], [`verify_archives`],
//!   [`verify_export_file`], the merge of database and witness checkpoints,
//!   and the verdicts ([`Verified`], [`Coverage`], [`TrailFailure`]);
//! - `export_trail`: [`export_database`], the JSON Lines export of the
//!   trail (or of a range, from its anchor);
//! - `proofs`: [`prove_from_database`], [`prove_from_export`],
//!   [`check_proof_file`] and [`describe_proof`].
//!
//! The command line itself (argument parsing, output, exit codes) is
//! `src/bin/vault-audit.rs`.
//!
//! [`Verifier`]: crate::verify::Verifier
//! [`EntryProof`]: crate::proof::EntryProof

mod export_trail;
mod proofs;
mod verify_trail;
mod witness;

pub use export_trail::{export_database, ExportDbError, Exported};
pub use proofs::{
    check_proof_file, describe_proof, prove_from_database, prove_from_export, CheckProofError,
    ProveError,
};
pub use verify_trail::{
    verify_archives, verify_database, verify_export_file, Coverage, Source, TrailFailure, Verified,
    VerifyError,
};
pub use witness::{Witness, WitnessError};

/// Lowercase hex (roots, hashes) for the tool's output.
pub fn hex(bytes: &[u8]) -> String {
    crate::hex::encode(bytes)
}
