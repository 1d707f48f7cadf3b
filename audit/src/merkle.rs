//! The Merkle tree of RFC 6962 (section 2.1), restated in RFC 9162
//! (section 2.1), over leaf hashes.
//!
//! - Merkle Tree Hash: the empty tree hashes to `SHA-256()`; one leaf is its
//!   leaf hash; `n > 1` leaves split at `k`, the largest power of two below
//!   `n`, and hash to `SHA-256(0x01 || MTH(D[0:k]) || MTH(D[k:n]))`
//!   ([`mth`], [`node_hash`]). Leaf hashes (`SHA-256(0x00 || leaf data)`) are
//!   made by [`crate::chain::leaf_hash`]; this module never sees entries.
//! - [`Frontier`]: the same root computed incrementally, keeping only the
//!   roots of the perfect subtrees along the right edge (one per set bit of
//!   the size, so at most 64 hashes).
//! - Inclusion proofs (RFC 9162 2.1.3) and consistency proofs (2.1.4):
//!   generation over a slice of leaf hashes ([`inclusion_proof`],
//!   [`consistency_proof`]) or streamed over leaves in O(log n) memory
//!   ([`ProofBuilder`]), and verification ([`verify_inclusion`],
//!   [`verify_consistency`]), which follows the RFC 9162 algorithms step by
//!   step.
//!
//! Leaf indices are 0-based as in the RFCs; the audit trail's `seq` is
//! `index + 1`.

use sha2::{Digest, Sha256};

/// Root of the empty tree: SHA-256 of the empty string.
pub fn empty_root() -> [u8; 32] {
    Sha256::digest([]).into()
}

/// Interior node: `SHA-256(0x01 || left || right)`.
pub fn node_hash(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([0x01]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The largest power of two strictly below `n` (`n >= 2`).
fn split(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1 << (63 - (n - 1).leading_zeros())
}

/// Merkle Tree Hash of a list of leaf hashes, by the recursive definition.
pub fn mth(leaves: &[[u8; 32]]) -> [u8; 32] {
    match leaves {
        [] => empty_root(),
        [leaf] => *leaf,
        _ => {
            // `split` of a length that fits in usize fits in usize.
            let k = split(leaves.len() as u64) as usize;
            node_hash(&mth(&leaves[..k]), &mth(&leaves[k..]))
        }
    }
}

/// The Merkle tree of a growing list of leaves, in O(log n) memory.
///
/// Keeps the roots of the perfect subtrees that make up the tree, largest
/// (leftmost) first: one per set bit of `size`. The root at any size equals
/// [`mth`] of all leaves pushed so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    nodes: Vec<[u8; 32]>,
}

impl Default for Frontier {
    fn default() -> Self {
        Self::new()
    }
}

impl Frontier {
    /// The empty tree.
    pub fn new() -> Self {
        Self {
            size: 0,
            nodes: Vec::with_capacity(64),
        }
    }

    /// Rebuild from a saved [`Frontier::size`] and [`Frontier::nodes`]
    /// (e.g. kept next to a checkpoint, to resume without rereading every
    /// leaf). `None` unless there is exactly one node per set bit of `size`.
    pub fn from_parts(size: u64, nodes: Vec<[u8; 32]>) -> Option<Self> {
        (nodes.len() == size.count_ones() as usize).then_some(Self { size, nodes })
    }

    /// Number of leaves.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Roots of the perfect subtrees, largest first.
    pub fn nodes(&self) -> &[[u8; 32]] {
        &self.nodes
    }

    /// Append one leaf hash.
    pub fn push(&mut self, leaf: [u8; 32]) {
        // Each trailing set bit of the old size is a perfect subtree of the
        // height the new node has reached: merge them, right to left.
        let mut node = leaf;
        let mut bits = self.size;
        while bits & 1 == 1 {
            // One node per set bit, so a set bit always has its node.
            let Some(left) = self.nodes.pop() else { break };
            node = node_hash(&left, &node);
            bits >>= 1;
        }
        self.nodes.push(node);
        self.size += 1;
    }

    /// The Merkle Tree Hash of all leaves pushed so far.
    pub fn root(&self) -> [u8; 32] {
        let mut nodes = self.nodes.iter().rev();
        match nodes.next() {
            None => empty_root(),
            Some(last) => nodes.fold(*last, |right, left| node_hash(left, &right)),
        }
    }
}

/// Append to `out` the subtrees `[start, end)` whose roots form the audit
/// path of leaf `index` in the tree over `[start, end)`, in proof order
/// (RFC 6962 2.1.1, PATH).
fn inclusion_ranges(index: u64, start: u64, end: u64, out: &mut Vec<(u64, u64)>) {
    let n = end - start;
    if n <= 1 {
        return;
    }
    let k = split(n);
    if index - start < k {
        inclusion_ranges(index, start, start + k, out);
        out.push((start + k, end));
    } else {
        inclusion_ranges(index, start + k, end, out);
        out.push((start, start + k));
    }
}

/// The same for a consistency proof (RFC 6962 2.1.2, SUBPROOF): `m` leaves
/// of the tree over `[start, end)` were in the old tree.
fn consistency_ranges(m: u64, start: u64, end: u64, whole: bool, out: &mut Vec<(u64, u64)>) {
    let n = end - start;
    if m == n {
        if !whole {
            out.push((start, end));
        }
        return;
    }
    let k = split(n);
    if m <= k {
        consistency_ranges(m, start, start + k, whole, out);
        out.push((start + k, end));
    } else {
        consistency_ranges(m - k, start + k, end, false, out);
        out.push((start, start + k));
    }
}

/// Builds an inclusion or consistency proof while leaf hashes stream past,
/// in O(log n) memory: the proof is the roots of disjoint subtrees, each
/// computed by its own [`Frontier`] as its leaves go by.
#[derive(Debug, Clone)]
pub struct ProofBuilder {
    /// Subtrees sorted by start: (start, end, position in the proof).
    ranges: Vec<(u64, u64, usize)>,
    proof: Vec<Option<[u8; 32]>>,
    /// Index into `ranges` of the first subtree not yet finished.
    cursor: usize,
    current: Frontier,
    pushed: u64,
    needed: u64,
}

impl ProofBuilder {
    /// Inclusion proof of leaf `index` in the tree of the first `tree_size`
    /// leaves. `None` if `index >= tree_size`.
    pub fn inclusion(index: u64, tree_size: u64) -> Option<Self> {
        if index >= tree_size {
            return None;
        }
        let mut ranges = Vec::new();
        inclusion_ranges(index, 0, tree_size, &mut ranges);
        Some(Self::over(ranges, tree_size))
    }

    /// Consistency proof between the trees of the first `old_size` and
    /// `new_size` leaves. `None` unless `0 < old_size <= new_size`.
    pub fn consistency(old_size: u64, new_size: u64) -> Option<Self> {
        if old_size == 0 || old_size > new_size {
            return None;
        }
        let mut ranges = Vec::new();
        consistency_ranges(old_size, 0, new_size, true, &mut ranges);
        Some(Self::over(ranges, new_size))
    }

    fn over(ranges: Vec<(u64, u64)>, needed: u64) -> Self {
        let proof = vec![None; ranges.len()];
        let mut ranges: Vec<_> = ranges
            .into_iter()
            .enumerate()
            .map(|(pos, (start, end))| (start, end, pos))
            .collect();
        ranges.sort_unstable();
        Self {
            ranges,
            proof,
            cursor: 0,
            current: Frontier::new(),
            pushed: 0,
            needed,
        }
    }

    /// How many leaves the proof needs (the first `needed()` of the log).
    pub fn needed(&self) -> u64 {
        self.needed
    }

    /// Feed the next leaf hash (leaves beyond [`ProofBuilder::needed`] are
    /// ignored).
    pub fn push(&mut self, leaf: [u8; 32]) {
        let at = self.pushed;
        self.pushed += 1;
        while let Some(&(start, end, pos)) = self.ranges.get(self.cursor) {
            if at < start {
                return; // a leaf no subtree of the proof covers
            }
            if at >= end {
                self.cursor += 1;
                continue;
            }
            if at == start {
                self.current = Frontier::new();
            }
            self.current.push(leaf);
            if at + 1 == end {
                self.proof[pos] = Some(self.current.root());
                self.cursor += 1;
            }
            return;
        }
    }

    /// The proof, once all needed leaves were pushed.
    pub fn finish(self) -> Option<Vec<[u8; 32]>> {
        if self.pushed < self.needed {
            return None;
        }
        self.proof.into_iter().collect()
    }
}

/// Inclusion proof (audit path) of leaf `index` in the tree of the first
/// `tree_size` of `leaves`. `None` if `index >= tree_size` or there are
/// fewer than `tree_size` leaves.
pub fn inclusion_proof(leaves: &[[u8; 32]], index: u64, tree_size: u64) -> Option<Vec<[u8; 32]>> {
    let mut builder = ProofBuilder::inclusion(index, tree_size)?;
    leaves
        .iter()
        .take(usize::try_from(tree_size).ok()?)
        .for_each(|leaf| builder.push(*leaf));
    builder.finish()
}

/// Consistency proof between the trees of the first `old_size` and the
/// first `new_size` of `leaves` (empty when the sizes are equal). `None`
/// unless `0 < old_size <= new_size <= leaves.len()`.
pub fn consistency_proof(
    leaves: &[[u8; 32]],
    old_size: u64,
    new_size: u64,
) -> Option<Vec<[u8; 32]>> {
    let mut builder = ProofBuilder::consistency(old_size, new_size)?;
    leaves
        .iter()
        .take(usize::try_from(new_size).ok()?)
        .for_each(|leaf| builder.push(*leaf));
    builder.finish()
}

/// Verify an inclusion proof (RFC 9162 2.1.3.2): is `leaf_hash` the leaf at
/// `index` of the tree of size `tree_size` whose root is `root`?
pub fn verify_inclusion(
    leaf_hash: &[u8; 32],
    index: u64,
    tree_size: u64,
    proof: &[[u8; 32]],
    root: &[u8; 32],
) -> bool {
    // 1. The index must be inside the tree.
    if index >= tree_size {
        return false;
    }
    // 2-3.
    let mut fnode = index;
    let mut snode = tree_size - 1;
    let mut r = *leaf_hash;
    // 4.
    for p in proof {
        // 4a.
        if snode == 0 {
            return false;
        }
        // 4b.
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        // 4c.
        fnode >>= 1;
        snode >>= 1;
    }
    // 5.
    snode == 0 && r == *root
}

/// Verify a consistency proof (RFC 9162 2.1.4.2): is the tree of size
/// `old_size` with root `old_root` a prefix of the tree of size `new_size`
/// with root `new_root`? Equal sizes need an empty proof and equal roots.
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &[u8; 32],
    new_root: &[u8; 32],
    proof: &[[u8; 32]],
) -> bool {
    if old_size == 0 || old_size > new_size {
        return false;
    }
    if old_size == new_size {
        return proof.is_empty() && old_root == new_root;
    }
    // 1.
    let Some((first, rest)) = proof.split_first() else {
        return false;
    };
    // 2. A power-of-two old tree is itself a node of the new one: its root
    // starts the path.
    let (start, path) = if old_size.is_power_of_two() {
        (old_root, proof)
    } else {
        (first, rest)
    };
    // 3-4.
    let mut fnode = old_size - 1;
    let mut snode = new_size - 1;
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    // 5.
    let mut fr = *start;
    let mut sr = *start;
    // 6.
    for c in path {
        // 6a.
        if snode == 0 {
            return false;
        }
        // 6b.
        if fnode & 1 == 1 || fnode == snode {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        // 6c.
        fnode >>= 1;
        snode >>= 1;
    }
    // 7.
    fr == *old_root && sr == *new_root && snode == 0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::hex;

    /// RFC 6962 leaf hash of raw leaf data.
    fn leaf(data: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update([0x00]);
        h.update(data);
        h.finalize().into()
    }

    /// The definition, written independently of the code under test: MTH
    /// over raw data, with its own split by halving.
    fn reference_mth(data: &[Vec<u8>]) -> [u8; 32] {
        match data.len() {
            0 => Sha256::digest([]).into(),
            1 => leaf(&data[0]),
            n => {
                let mut k = 1;
                while k * 2 < n {
                    k *= 2;
                }
                let mut h = Sha256::new();
                h.update([0x01]);
                h.update(reference_mth(&data[..k]));
                h.update(reference_mth(&data[k..]));
                h.finalize().into()
            }
        }
    }

    /// RFC 6962 2.1.1 PATH(m, D[n]), written from the definition.
    fn reference_path(m: usize, data: &[Vec<u8>]) -> Vec<[u8; 32]> {
        let n = data.len();
        if n <= 1 {
            return Vec::new();
        }
        let mut k = 1;
        while k * 2 < n {
            k *= 2;
        }
        if m < k {
            let mut p = reference_path(m, &data[..k]);
            p.push(reference_mth(&data[k..]));
            p
        } else {
            let mut p = reference_path(m - k, &data[k..]);
            p.push(reference_mth(&data[..k]));
            p
        }
    }

    /// RFC 6962 2.1.2 SUBPROOF(m, D[n], b), from the definition.
    fn reference_subproof(m: usize, data: &[Vec<u8>], whole: bool) -> Vec<[u8; 32]> {
        let n = data.len();
        if m == n {
            return if whole {
                Vec::new()
            } else {
                vec![reference_mth(data)]
            };
        }
        let mut k = 1;
        while k * 2 < n {
            k *= 2;
        }
        if m <= k {
            let mut p = reference_subproof(m, &data[..k], whole);
            p.push(reference_mth(&data[k..]));
            p
        } else {
            let mut p = reference_subproof(m - k, &data[k..], false);
            p.push(reference_mth(&data[..k]));
            p
        }
    }

    fn data(n: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| format!("entry {i}").into_bytes()).collect()
    }

    fn leaves(data: &[Vec<u8>]) -> Vec<[u8; 32]> {
        data.iter().map(|d| leaf(d)).collect()
    }

    /// The eight leaves used by the Certificate Transparency test suites,
    /// and the Merkle Tree Hash of each prefix.
    #[test]
    fn known_vectors() {
        let inputs: [&[u8]; 8] = [
            b"",
            b"\x00",
            b"\x10",
            b"\x20\x21",
            b"\x30\x31",
            b"\x40\x41\x42\x43",
            b"\x50\x51\x52\x53\x54\x55\x56\x57",
            b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
        ];
        let roots = [
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
        ];
        let hashes: Vec<[u8; 32]> = inputs.iter().map(|d| leaf(d)).collect();
        let mut frontier = Frontier::new();
        for (size, expected) in roots.iter().enumerate() {
            assert_eq!(hex::encode(&mth(&hashes[..size])), *expected, "mth({size})");
            assert_eq!(hex::encode(&frontier.root()), *expected, "frontier({size})");
            if size < hashes.len() {
                frontier.push(hashes[size]);
            }
        }
    }

    #[test]
    fn frontier_equals_recursive_mth_for_sizes_0_to_70() {
        let all = data(70);
        let mut frontier = Frontier::new();
        for size in 0..=70 {
            let expected = reference_mth(&all[..size]);
            assert_eq!(frontier.size(), size as u64);
            assert_eq!(frontier.root(), expected, "size {size}");
            assert_eq!(mth(&leaves(&all[..size])), expected, "size {size}");
            assert_eq!(frontier.nodes().len(), size.count_ones() as usize);
            let resumed = Frontier::from_parts(size as u64, frontier.nodes().to_vec()).unwrap();
            assert_eq!(resumed.root(), expected);
            if size < 70 {
                frontier.push(leaf(&all[size]));
            }
        }
        assert!(Frontier::from_parts(3, vec![[0; 32]]).is_none());
    }

    #[test]
    fn inclusion_proofs_for_every_index_of_sizes_1_to_40() {
        let all = data(40);
        let hashes = leaves(&all);
        for size in 1..=40u64 {
            let part = &all[..size as usize];
            let root = reference_mth(part);
            for index in 0..size {
                let proof = inclusion_proof(&hashes, index, size).unwrap();
                assert_eq!(
                    proof,
                    reference_path(index as usize, part),
                    "size {size} index {index}"
                );
                let leaf = &hashes[index as usize];
                assert!(verify_inclusion(leaf, index, size, &proof, &root));
                // Wrong leaf, index, size, root, or a damaged path: refused.
                let other = &hashes[((index + 1) % 40) as usize];
                assert!(!verify_inclusion(other, index, size, &proof, &root));
                if size > 1 {
                    let wrong_index = (index + 1) % size;
                    assert!(!verify_inclusion(leaf, wrong_index, size, &proof, &root));
                }
                // (Against the same root a proof may also fit another size
                // with the same shape: the size comes from the signed
                // checkpoint, with its own root.)
                if size < 40 {
                    let bigger_root = reference_mth(&all[..=size as usize]);
                    assert!(!verify_inclusion(
                        leaf,
                        index,
                        size + 1,
                        &proof,
                        &bigger_root
                    ));
                }
                assert!(!verify_inclusion(leaf, size, size, &proof, &root));
                assert!(!verify_inclusion(leaf, index, size, &proof, &[0; 32]));
                for i in 0..proof.len() {
                    let mut bad = proof.clone();
                    bad[i][0] ^= 1;
                    assert!(!verify_inclusion(leaf, index, size, &bad, &root));
                }
                let mut longer = proof.clone();
                longer.push(root);
                assert!(!verify_inclusion(leaf, index, size, &longer, &root));
                if !proof.is_empty() {
                    let shorter = &proof[..proof.len() - 1];
                    assert!(!verify_inclusion(leaf, index, size, shorter, &root));
                }
            }
        }
        assert!(inclusion_proof(&hashes, 3, 3).is_none());
        assert!(inclusion_proof(&hashes, 0, 41).is_none());
    }

    #[test]
    fn consistency_proofs_for_every_pair_of_sizes_up_to_40() {
        let all = data(40);
        let hashes = leaves(&all);
        for new in 1..=40usize {
            let new_root = reference_mth(&all[..new]);
            for old in 1..=new {
                let old_root = reference_mth(&all[..old]);
                let proof = consistency_proof(&hashes, old as u64, new as u64).unwrap();
                assert_eq!(
                    proof,
                    reference_subproof(old, &all[..new], true),
                    "{old}->{new}"
                );
                let (o, n) = (old as u64, new as u64);
                assert!(verify_consistency(o, n, &old_root, &new_root, &proof));
                assert!(!verify_consistency(o, n, &new_root, &old_root, &proof) || old == new);
                assert!(!verify_consistency(o, n, &[7; 32], &new_root, &proof));
                assert!(!verify_consistency(o, n, &old_root, &[7; 32], &proof));
                for i in 0..proof.len() {
                    let mut bad = proof.clone();
                    bad[i][31] ^= 0x80;
                    assert!(!verify_consistency(o, n, &old_root, &new_root, &bad));
                }
                if old > 1 {
                    assert!(!verify_consistency(o - 1, n, &old_root, &new_root, &proof));
                }
            }
        }
        assert!(consistency_proof(&hashes, 0, 5).is_none());
        assert!(consistency_proof(&hashes, 6, 5).is_none());
        assert!(!verify_consistency(0, 5, &[0; 32], &[0; 32], &[]));
    }

    #[test]
    fn streaming_builder_needs_every_leaf_it_covers() {
        let hashes = leaves(&data(10));
        let mut builder = ProofBuilder::inclusion(4, 10).unwrap();
        assert_eq!(builder.needed(), 10);
        hashes[..9].iter().for_each(|l| builder.push(*l));
        assert!(builder.clone().finish().is_none());
        builder.push(hashes[9]);
        builder.push([9; 32]); // beyond the tree: ignored
        assert_eq!(builder.finish(), inclusion_proof(&hashes, 4, 10));
    }
}
