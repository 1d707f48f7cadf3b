//! Private files: created with mode 0600, refused when others can reach
//! them (see [`is_private_file`]), written durably (fsync of the file and of
//! its directory) and replaced atomically (write a temporary file beside
//! it, then rename).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::KekError;

pub(crate) fn shown(path: &Path) -> String {
    path.display().to_string()
}

/// Whether a file holding a secret (a key, a share, a PIN, an API key) is
/// private enough to use: no access for group or others (0600, 0400), or,
/// when root owns it, read access for its group too (0640, 0440) and
/// nothing for others. The second form is how Kubernetes mounts a Secret
/// for a non-root process (owner root, group the pod's `fsGroup`), and the
/// rule PostgreSQL applies to its TLS key.
pub fn is_private_file(meta: &fs::Metadata) -> bool {
    let mode = meta.mode() & 0o777;
    mode & 0o077 == 0 || (meta.uid() == 0 && mode & 0o037 == 0)
}

/// Refuse a file that others can access in any way (see [`is_private_file`]).
pub(crate) fn check_private(path: &Path) -> Result<(), KekError> {
    let meta = fs::metadata(path).map_err(|source| KekError::Read {
        path: shown(path),
        source,
    })?;
    let mode = meta.mode() & 0o777;
    if !is_private_file(&meta) {
        return Err(KekError::InsecurePermissions {
            path: shown(path),
            mode,
        });
    }
    Ok(())
}

/// Read a private file (permissions checked first).
pub(crate) fn read_private(path: &Path) -> Result<Vec<u8>, KekError> {
    check_private(path)?;
    fs::read(path).map_err(|source| KekError::Read {
        path: shown(path),
        source,
    })
}

fn write_err(path: &Path) -> impl Fn(std::io::Error) -> KekError + '_ {
    move |source| KekError::Write {
        path: shown(path),
        source,
    }
}

/// A temporary sibling of `path`, created with mode 0600, holding `bytes`,
/// flushed to disk. Removed again on drop unless it was renamed away.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn write_temp(path: &Path, bytes: &[u8]) -> Result<TempFile, KekError> {
    let name = path
        .file_name()
        .ok_or_else(|| KekError::Write {
            path: shown(path),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
        })?
        .to_string_lossy()
        .into_owned();
    let mut suffix = [0u8; 8];
    getrandom::getrandom(&mut suffix).map_err(|_| KekError::Rng)?;
    let tmp_name = format!(".{name}.tmp-{}", crate::to_hex(&suffix));
    let tmp = TempFile {
        path: path.with_file_name(tmp_name),
        keep: false,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp.path)
        .map_err(write_err(path))?;
    file.write_all(bytes).map_err(write_err(path))?;
    file.sync_all().map_err(write_err(path))?;
    Ok(tmp)
}

fn sync_parent(path: &Path) -> Result<(), KekError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(write_err(path))
}

/// Create `path` (mode 0600) holding `bytes`. Refuses to overwrite an
/// existing file; the file appears complete or not at all.
pub(crate) fn create_private(path: &Path, bytes: &[u8]) -> Result<(), KekError> {
    if fs::symlink_metadata(path).is_ok() {
        return Err(KekError::AlreadyExists { path: shown(path) });
    }
    let tmp = write_temp(path, bytes)?;
    // A hard link fails if the target exists: no window in which a concurrent
    // creator's file would be replaced.
    fs::hard_link(&tmp.path, path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            KekError::AlreadyExists { path: shown(path) }
        } else {
            KekError::Write {
                path: shown(path),
                source,
            }
        }
    })?;
    drop(tmp);
    sync_parent(path)
}

/// Replace the existing `path` by a file (mode 0600) holding `bytes`,
/// atomically: readers see the old or the new content, never a mix.
pub(crate) fn replace_private(path: &Path, bytes: &[u8]) -> Result<(), KekError> {
    let mut tmp = write_temp(path, bytes)?;
    fs::rename(&tmp.path, path).map_err(write_err(path))?;
    tmp.keep = true;
    sync_parent(path)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn private_files_and_the_root_owned_group_readable_form() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        fs::write(&path, "x").unwrap();
        let with = |mode: u32| {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            is_private_file(&fs::metadata(&path).unwrap())
        };
        for mode in [0o600, 0o400, 0o700] {
            assert!(with(mode), "{mode:o}");
        }
        for mode in [0o604, 0o644, 0o660, 0o666, 0o606, 0o620] {
            assert!(!with(mode), "{mode:o}");
        }
        let root = fs::metadata(&path).unwrap().uid() == 0;
        // Group read is private only when root owns the file.
        assert_eq!(with(0o640), root);
        assert_eq!(with(0o440), root);
        if root {
            std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
            assert!(!with(0o640));
            assert!(!with(0o440));
            assert!(with(0o600));
        }
    }
}
