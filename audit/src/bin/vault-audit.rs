//! `vault-audit`: the auditor's tool for cardvault's tamper-evident audit
//! trail. It needs the checkpoint public key (`<data-dir>/audit-verify.pub`
//! of the service, lines `cardvault-audit-ed25519:<hex>`, to be kept by the
//! auditor apart from the database; after a signing key rotation the first
//! key is enough: later keys are followed through the announcements the old
//! key signed) and read access to the trail: the
//! service's database (the runtime role's SELECT suffices; SQLite is opened
//! read-only) or an export file.
//!
//! Exit status: 0 success (for `verify`: every entry is covered by a signed
//! checkpoint that verified), 1 verification failure (the trail, a
//! checkpoint or a proof does not hold, or a trail with entries has no
//! signed checkpoint; the output says what and where), 2 usage or
//! input/output error (nothing was concluded about the trail), 3 (`verify`
//! only) the chain verifies but its last N entries are not yet covered by a
//! signed checkpoint (N printed; the normal state of a live database
//! between two checkpoints). The tool fails closed: it never exits 0 about
//! entries it could not check against a signature.
#![forbid(unsafe_code)]
// stdout is this tool's output (reports, exports, proofs); stderr carries
// the errors.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::fs::{self, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use audit::auditor::{self, Coverage, VerifyError, Witness};
use audit::{TrustedKeys, VerifyingKey};
use clap::{ArgGroup, Args, Parser, Subcommand};

/// Verify, export and prove cardvault's tamper-evident audit trail.
///
/// Entries form a hash chain and a Merkle tree (RFC 6962); the service signs
/// checkpoints (tree size, Merkle root, chain head, time) with a key the
/// database never holds, and appends each one to a witness file outside the
/// database. With the public key, anyone can check that no entry was
/// changed, inserted, removed, reordered or cut off, and where.
///
/// Exit status: 0 success (verify: every entry covered by a verified
/// signed checkpoint), 1 verification failure (including entries without any
/// signed checkpoint), 2 usage or I/O error, 3 (verify) the chain verifies
/// but the last N entries are not yet covered by a signed checkpoint.
#[derive(Debug, Parser)]
#[command(name = "vault-audit", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Verify the whole trail: every entry, every checkpoint (database and
    /// witness file), and that the witness file's checkpoints are all in the
    /// database unchanged.
    ///
    /// Prints `verified N entries and K checkpoints (root .., last seq ..,
    /// anchored at ..)` and exits 0 only if every entry is covered by a
    /// signed checkpoint it verified. Exits 3, printing how many, when the
    /// chain verifies but the last entries are not yet covered (they are
    /// protected by the hash chain only until the next checkpoint). Exits 1
    /// on a trail with entries and no signed checkpoint, and on any
    /// failure, printing the first changed, inserted, removed, reordered or
    /// truncated entry (or, for a chain rebuilt with recomputed hashes, the
    /// checkpoint interval it lies in). With --database-url the witness
    /// file is required, unless --no-witness is given.
    Verify(VerifyArgs),
    /// Write the trail as JSON Lines: an anchor line when it does not start
    /// at entry 1, the checkpoints it reaches, then the entries.
    ///
    /// Every export verifies on its own with `verify --export`: a range
    /// starts from an anchor (the chain head and Merkle frontier before its
    /// first entry, taken from the stored hashes), which the first signed
    /// checkpoint in the range confirms. Entries after the range's last
    /// checkpoint are reported as not covered. Entries archived out of the
    /// database are not exported (they are in their archive files).
    Export(ExportArgs),
    /// Print an inclusion proof (JSON) of entry SEQ against a signed
    /// checkpoint, checkable with `check-proof` and the public key alone.
    Prove(ProveArgs),
    /// Check an inclusion proof with the public key; print what it proves.
    CheckProof(CheckProofArgs),
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("trail").required(true).multiple(true).args(["database_url", "export", "archive"])))]
struct VerifyArgs {
    /// A checkpoint public key file: one or more lines
    /// `cardvault-audit-ed25519:<hex>` (repeat the option for several
    /// files). Checkpoints must be signed by one of these keys or by a key
    /// a trusted key announced in a checkpoint that verified (a signing key
    /// rotation): the first key alone verifies a trail across rotations.
    /// A checkpoint signed by any other key fails verification.
    #[arg(
        long,
        alias = "public-key",
        value_name = "PUBKEY_FILE",
        required = true
    )]
    key: Vec<PathBuf>,
    /// The service's database: `sqlite://PATH` (opened read-only) or
    /// `postgres://...`.
    #[arg(long, value_name = "URL")]
    database_url: Option<String>,
    /// An export written by `vault-audit export` (a full one, or a range:
    /// a range starts with an anchor line and verifies on its own).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["database_url", "archive"])]
    export: Option<PathBuf>,
    /// Archive files written by `tokenizer audit archive`, oldest first
    /// (repeat the option). They are verified one after the other, each
    /// must continue exactly where the one before ends, and the entries
    /// still in the database (with --database-url) must continue after the
    /// last one. Without them, verification of the database starts after
    /// its last archived segment.
    #[arg(long, value_name = "FILE")]
    archive: Vec<PathBuf>,
    /// The witness file (`<data-dir>/audit-checkpoints.jsonl`): its
    /// checkpoints are verified too and must all be in the database (or
    /// export), unchanged. Without it, someone who can write the database
    /// could delete the checkpoints and rebuild the chain unnoticed. Repeat
    /// for several instances' files. Required with --database-url unless
    /// --no-witness is given.
    #[arg(long, value_name = "FILE")]
    witness: Vec<PathBuf>,
    /// Verify the database without a witness file, knowingly: a checkpoint
    /// deleted from the database together with the entries after it (and a
    /// chain rebuilt after that point) then goes unnoticed. The output says
    /// so.
    #[arg(long, conflicts_with = "witness")]
    no_witness: bool,
}

#[derive(Debug, Args)]
struct ExportArgs {
    /// The service's database: `sqlite://PATH` or `postgres://...`.
    #[arg(long, value_name = "URL")]
    database_url: String,
    /// First entry (seq) to export; default the first one in the database.
    #[arg(long, value_name = "SEQ")]
    from: Option<u64>,
    /// Last entry (seq) to export; default the last one.
    #[arg(long, value_name = "SEQ")]
    to: Option<u64>,
    /// Write to this new file (mode 0600; an existing file is not
    /// overwritten) instead of stdout.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("trail").required(true).args(["database_url", "export"])))]
struct ProveArgs {
    /// The entry to prove (its seq, 1-based).
    #[arg(value_name = "SEQ")]
    seq: u64,
    /// The service's database: `sqlite://PATH` or `postgres://...`.
    #[arg(long, value_name = "URL")]
    database_url: Option<String>,
    /// An export written by `vault-audit export`.
    #[arg(long, value_name = "FILE")]
    export: Option<PathBuf>,
    /// Prove against the checkpoint for this many entries; default: the
    /// smallest checkpoint that covers SEQ.
    #[arg(long, value_name = "TREE_SIZE")]
    checkpoint: Option<u64>,
}

#[derive(Debug, Args)]
struct CheckProofArgs {
    /// A checkpoint public key file (lines `cardvault-audit-ed25519:<hex>`;
    /// repeat for several files): the key the proof's checkpoint names must
    /// be among them.
    #[arg(
        long,
        alias = "public-key",
        value_name = "PUBKEY_FILE",
        required = true
    )]
    key: Vec<PathBuf>,
    /// A proof printed by `vault-audit prove`.
    #[arg(long, value_name = "FILE")]
    proof: PathBuf,
}

/// Verification failed: exit 1.
const FAILED: u8 = 1;
/// Usage or input/output error: exit 2.
const ERROR: u8 = 2;
/// Verify: the chain verifies, its last entries are not yet covered by a
/// signed checkpoint: exit 3.
const UNCOVERED: u8 = 3;

/// What `--no-witness` gives up, printed with its result.
const NO_WITNESS: &str = "note: verified without the witness file (--no-witness): someone able to write the database could have deleted the last checkpoints and rebuilt the chain after the last one left, and this run could not tell";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let status = match cli.command {
        Command::Verify(args) => verify(args),
        Command::Export(args) => export(args),
        Command::Prove(args) => prove(args),
        Command::CheckProof(args) => check_proof(args),
    };
    match status {
        Ok(()) => ExitCode::SUCCESS,
        Err(code) => ExitCode::from(code),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, u8> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| error(format!("cannot start the async runtime: {e}")))
}

/// Print an error to stderr; the usage/IO exit status.
fn error(message: impl std::fmt::Display) -> u8 {
    eprintln!("vault-audit: error: {message}");
    ERROR
}

/// Every key of the key files (one or more key lines each).
fn read_keys(paths: &[PathBuf]) -> Result<TrustedKeys, u8> {
    let mut keys = Vec::new();
    for path in paths {
        let text = fs::read_to_string(path)
            .map_err(|e| error(format!("cannot read the key file {}: {e}", path.display())))?;
        keys.extend(
            VerifyingKey::parse_many(&text)
                .map_err(|e| error(format!("key file {}: {e}", path.display())))?,
        );
    }
    Ok(TrustedKeys::new(keys))
}

fn verify(args: VerifyArgs) -> Result<(), u8> {
    if args.database_url.is_some() && args.witness.is_empty() && !args.no_witness {
        return Err(error(
            "--database-url needs the witness file (--witness FILE, <data-dir>/audit-checkpoints.jsonl): without it, checkpoints deleted from the database and a chain rebuilt after them go unnoticed; --no-witness verifies without it, knowingly",
        ));
    }
    let key = read_keys(&args.key)?;
    let open = |path: &PathBuf| {
        Witness::open(path).map_err(|e| error(format!("{e} ({})", path.display())))
    };
    let witness = match args.witness.as_slice() {
        [] => None,
        // One file (the usual case) is streamed.
        [path] => Some(open(path)?),
        paths => {
            let mut all = Vec::new();
            for path in paths {
                let checkpoints = open(path)?
                    .into_vec()
                    .map_err(|e| error(format!("{e} ({})", path.display())))?;
                all.extend(checkpoints);
            }
            Some(Witness::from_checkpoints(all))
        }
    };
    let archives: Vec<&Path> = args.archive.iter().map(PathBuf::as_path).collect();
    let result = match (&args.database_url, &args.export) {
        (Some(url), _) => {
            runtime()?.block_on(auditor::verify_database(url, &key, witness, &archives))
        }
        (None, Some(path)) => auditor::verify_export_file(path, &key, witness),
        (None, None) if !archives.is_empty() => {
            runtime()?.block_on(auditor::verify_archives(&archives, &key, witness))
        }
        (None, None) => return Err(error("give --database-url, --export or --archive")),
    };
    match result {
        Ok(verified) => {
            for line in verified.lines() {
                println!("{line}");
            }
            if args.no_witness {
                println!("{NO_WITNESS}");
            }
            let coverage = verified.coverage();
            match coverage {
                Coverage::Complete => Ok(()),
                Coverage::Uncovered { .. } => {
                    println!("not covered: {coverage}");
                    Err(UNCOVERED)
                }
                Coverage::Unsigned { .. } => {
                    println!("verification FAILED: {coverage}");
                    Err(FAILED)
                }
            }
        }
        Err(VerifyError::Failed(failure)) => {
            println!("verification FAILED: {failure}");
            Err(FAILED)
        }
        Err(e) => Err(error(e)),
    }
}

fn export(args: ExportArgs) -> Result<(), u8> {
    let range = match (args.from, args.to) {
        (None, None) => None,
        (from, to) => {
            let (from, to) = (from.unwrap_or(1), to.unwrap_or(u64::MAX));
            if from > to {
                return Err(error(format!("--from {from} is after --to {to}")));
            }
            Some((from, to))
        }
    };
    let rt = runtime()?;
    let result = match &args.out {
        Some(path) => {
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| error(format!("cannot create {}: {e}", path.display())))?;
            let mut out = BufWriter::new(file);
            let written = rt.block_on(auditor::export_database(
                &args.database_url,
                range,
                &mut out,
            ));
            written.and_then(|counts| {
                let file = out
                    .into_inner()
                    .map_err(|e| audit::export::ExportError::Io(io::Error::other(e.to_string())))?;
                file.sync_all().map_err(audit::export::ExportError::Io)?;
                Ok(counts)
            })
        }
        None => {
            let stdout = io::stdout();
            let mut out = BufWriter::new(stdout.lock());
            let written = rt.block_on(auditor::export_database(
                &args.database_url,
                range,
                &mut out,
            ));
            written.and_then(|counts| {
                out.flush().map_err(audit::export::ExportError::Io)?;
                Ok(counts)
            })
        }
    };
    match result {
        Ok(counts) => {
            if let Some(path) = &args.out {
                eprintln!(
                    "vault-audit: exported {} checkpoints and {} entries to {}",
                    counts.checkpoints,
                    counts.entries,
                    path.display()
                );
            }
            Ok(())
        }
        Err(e) => Err(error(e)),
    }
}

fn prove(args: ProveArgs) -> Result<(), u8> {
    let result = match (&args.database_url, &args.export) {
        (Some(url), _) => {
            runtime()?.block_on(auditor::prove_from_database(url, args.seq, args.checkpoint))
        }
        (None, Some(path)) => auditor::prove_from_export(path, args.seq, args.checkpoint),
        (None, None) => return Err(error("give --database-url or --export")),
    };
    match result {
        Ok(proof) => {
            let json = serde_json::to_string_pretty(&proof)
                .map_err(|e| error(format!("cannot write the proof: {e}")))?;
            println!("{json}");
            Ok(())
        }
        Err(e) if e.is_verification_failure() => {
            println!("cannot prove entry {}: {e}", args.seq);
            Err(FAILED)
        }
        Err(e) => Err(error(e)),
    }
}

fn check_proof(args: CheckProofArgs) -> Result<(), u8> {
    let key = read_keys(&args.key)?;
    match auditor::check_proof_file(&args.proof, &key) {
        Ok(proof) => {
            for line in auditor::describe_proof(&proof) {
                println!("{line}");
            }
            Ok(())
        }
        Err(auditor::CheckProofError::Io(e)) => Err(error(format!(
            "cannot read the proof file {}: {e}",
            args.proof.display()
        ))),
        Err(e) => {
            println!("proof REJECTED: {e}");
            Err(FAILED)
        }
    }
}
