//! argon2id parameters of a custodian's share key ([`KdfParams`]): the
//! default, the bounds a keyring file must respect, and the derivation of
//! the key that encrypts the custodian's share.

use zeroize::Zeroizing;

use crate::KekError;

use super::KEY_LEN;

/// argon2id cost parameters of a custodian's share key. Stored with each
/// share; the default is m = 64 MiB, t = 3, p = 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    pub(super) m_cost_kib: u32,
    pub(super) t_cost: u32,
    pub(super) p_cost: u32,
}

impl Default for KdfParams {
    fn default() -> Self {
        Self {
            m_cost_kib: 64 * 1024,
            t_cost: 3,
            p_cost: 1,
        }
    }
}

impl KdfParams {
    /// Smallest memory cost accepted outside tests (KiB): 19 MiB.
    pub const MIN_M_COST_KIB: u32 = 19 * 1024;
    /// Smallest time cost accepted outside tests.
    pub const MIN_T_COST: u32 = 2;

    /// Parameters with memory `m_cost_kib` KiB, `t_cost` passes and
    /// `p_cost` lanes. Refuses anything below m = 19 MiB, t = 2, or above
    /// m = 4 GiB, t = 64, p = 16.
    pub fn new(m_cost_kib: u32, t_cost: u32, p_cost: u32) -> Result<Self, KekError> {
        let params = Self {
            m_cost_kib,
            t_cost,
            p_cost,
        };
        params.check(false)?;
        Ok(params)
    }

    /// Tiny parameters (m = 256 KiB, t = 1) so that tests run fast. Only in
    /// this crate's tests or with the `insecure-test-kdf` feature; a keyring
    /// made with them is cheap to brute-force.
    #[cfg(any(test, feature = "insecure-test-kdf"))]
    pub fn insecure_fast_for_tests() -> Self {
        Self {
            m_cost_kib: 256,
            t_cost: 1,
            p_cost: 1,
        }
    }

    /// Memory cost in KiB.
    pub fn m_cost_kib(&self) -> u32 {
        self.m_cost_kib
    }

    /// Time cost (passes).
    pub fn t_cost(&self) -> u32 {
        self.t_cost
    }

    /// Parallelism (lanes).
    pub fn p_cost(&self) -> u32 {
        self.p_cost
    }

    pub(super) fn check(&self, allow_weak: bool) -> Result<(), KekError> {
        let reason = if self.p_cost == 0 || self.p_cost > 16 {
            Some("p must be 1 to 16")
        } else if self.t_cost == 0 || self.t_cost > 64 {
            Some("t must be 1 to 64")
        } else if self.m_cost_kib > 4 * 1024 * 1024 {
            Some("m must be at most 4 GiB")
        } else if self.m_cost_kib < 8 * self.p_cost {
            Some("m must be at least 8 KiB per lane")
        } else if !allow_weak
            && (self.m_cost_kib < Self::MIN_M_COST_KIB || self.t_cost < Self::MIN_T_COST)
        {
            Some("below the minimum m = 19 MiB, t = 2")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(KekError::KdfParams { reason }),
            None => Ok(()),
        }
    }

    pub(super) fn derive(
        &self,
        passphrase: &str,
        salt: &[u8],
    ) -> Result<Zeroizing<[u8; KEY_LEN]>, KekError> {
        let params = argon2::Params::new(self.m_cost_kib, self.t_cost, self.p_cost, Some(KEY_LEN))
            .map_err(|_| KekError::KdfParams {
                reason: "refused by argon2",
            })?;
        let argon =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        argon
            .hash_password_into(passphrase.as_bytes(), salt, key.as_mut())
            .map_err(|_| KekError::Kdf)?;
        Ok(key)
    }
}
