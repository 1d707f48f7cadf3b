//! K-of-N Shamir secret sharing of the master key over GF(2^8) with
//! `vsss-rs`: `split` (coefficients from bytes read from the OS CSPRNG up
//! front, `PrefetchedRng`) and `combine`.

use rand_core::{TryCryptoRng, TryRng};
use vsss_rs::{Gf256, IdentifierGf256};
use zeroize::Zeroizing;

use crate::KekError;

use super::{KEY_LEN, SHARE_LEN};

/// Split `master` into `n` shares `x || y` (x = 1..=n), any `k` of which
/// reconstruct it.
pub(super) fn split(
    master: &[u8; KEY_LEN],
    k: usize,
    n: usize,
) -> Result<Zeroizing<Vec<Vec<u8>>>, KekError> {
    // n <= 255 is checked by every caller.
    let ids = (1..=n).map(|x| u8::try_from(x).unwrap_or(u8::MAX));
    if k == 1 {
        return Ok(Zeroizing::new(
            ids.map(|x| {
                let mut share = Vec::with_capacity(SHARE_LEN);
                share.push(x);
                share.extend_from_slice(master);
                share
            })
            .collect(),
        ));
    }
    // vsss-rs draws one u32 per coefficient: 32 bytes x (k - 1) coefficients;
    // twice that is prefetched, and running short is an error, never a weak share.
    let mut rng = PrefetchedRng::new(KEY_LEN * (k - 1) * 8)?;
    let shares = Gf256::split_bytes_with_participant_ids_iter(
        k,
        n,
        master,
        &mut rng,
        ids.map(|x| IdentifierGf256(Gf256(x))),
    )
    .map_err(|e| KekError::SecretSharing {
        reason: e.to_string(),
    })?;
    let shares = Zeroizing::new(shares);
    if rng.exhausted {
        return Err(KekError::SecretSharing {
            reason: "ran out of prefetched randomness".to_owned(),
        });
    }
    Ok(shares)
}

/// Randomness for the polynomial coefficients: bytes read from the OS CSPRNG
/// up front (so a failing OS RNG is an error, not a panic inside the
/// splitter), handed out in order, zeroized on drop. Running out sets
/// `exhausted` (and yields zeros), which the caller turns into an error.
struct PrefetchedRng {
    bytes: Zeroizing<Vec<u8>>,
    pos: usize,
    exhausted: bool,
}

impl PrefetchedRng {
    fn new(len: usize) -> Result<Self, KekError> {
        let mut bytes = Zeroizing::new(vec![0u8; len]);
        getrandom::getrandom(&mut bytes).map_err(|_| KekError::Rng)?;
        Ok(Self {
            bytes,
            pos: 0,
            exhausted: false,
        })
    }

    fn take(&mut self, dst: &mut [u8]) {
        match self.bytes.get(self.pos..self.pos + dst.len()) {
            Some(src) => {
                dst.copy_from_slice(src);
                self.pos += dst.len();
            }
            None => {
                self.exhausted = true;
                dst.fill(0);
            }
        }
    }
}

impl TryRng for PrefetchedRng {
    type Error = std::convert::Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut b = [0u8; 4];
        self.take(&mut b);
        Ok(u32::from_le_bytes(b))
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut b = [0u8; 8];
        self.take(&mut b);
        Ok(u64::from_le_bytes(b))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        self.take(dst);
        Ok(())
    }
}

impl TryCryptoRng for PrefetchedRng {}

/// Reconstruct the master key from `k` shares `x || y`.
pub(super) fn combine(shares: &[Zeroizing<Vec<u8>>]) -> Result<Zeroizing<[u8; KEY_LEN]>, KekError> {
    let mut master = Zeroizing::new([0u8; KEY_LEN]);
    if let [single] = shares {
        master.copy_from_slice(&single[1..]);
        return Ok(master);
    }
    let owned: Zeroizing<Vec<Vec<u8>>> =
        Zeroizing::new(shares.iter().map(|s| s.to_vec()).collect());
    let secret = Zeroizing::new(Gf256::combine_bytes(owned.as_slice()).map_err(|e| {
        KekError::SecretSharing {
            reason: e.to_string(),
        }
    })?);
    if secret.len() != KEY_LEN {
        return Err(KekError::ReconstructionFailed);
    }
    master.copy_from_slice(&secret);
    Ok(master)
}
