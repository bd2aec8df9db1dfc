//! Exact per-feature contributions of a tree ensemble's raw score: path-dependent TreeSHAP
//! (Lundberg, Erion and Lee, "Consistent Individualized Feature Attribution for Tree
//! Ensembles", Algorithm 2, the algorithm of LightGBM's `pred_contrib` and of `shap`'s
//! `TreeExplainer` with `feature_perturbation="tree_path_dependent"`).
//!
//! A tree's nodes carry their cover (the training rows that reached them); a feature
//! outside a coalition follows both children, weighted by their covers. For one row the
//! contributions plus the ensemble's expected value equal its raw score (local accuracy).
//! Pure: no model loading here; the trees come from the caller.

/// One node of a tree to explain.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// `x[feature] <= threshold` goes to `yes`, a greater value to `no`; a missing value
    /// (NaN) goes to `yes` when `missing_yes`, else to `no`.
    Split {
        /// Feature index.
        feature: usize,
        /// Threshold.
        threshold: f32,
        /// Child for values at or below the threshold.
        yes: usize,
        /// Child for values above it.
        no: usize,
        /// Where a missing value goes.
        missing_yes: bool,
        /// Training rows that reached this node.
        cover: f64,
    },
    /// A leaf.
    Leaf {
        /// Its value (added to the raw score).
        value: f64,
        /// Training rows that reached it.
        cover: f64,
    },
}

impl Node {
    fn cover(&self) -> f64 {
        match self {
            Node::Split { cover, .. } | Node::Leaf { cover, .. } => *cover,
        }
    }
}

/// A tree: `nodes[root]` first reached.
#[derive(Debug, Clone, PartialEq)]
pub struct Tree {
    /// The nodes, children by index.
    pub nodes: Vec<Node>,
    /// The root's index.
    pub root: usize,
}

/// Why a tree cannot be explained.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A child index outside the tree, a cycle, or a split on a feature outside the row.
    #[error("tree {tree}: {reason}")]
    Malformed {
        /// The tree's position in the ensemble.
        tree: usize,
        /// What is wrong.
        reason: String,
    },
    /// A node without training rows: its children cannot be weighted.
    #[error("tree {tree}: node {node} has no cover")]
    NoCover {
        /// The tree's position.
        tree: usize,
        /// The node.
        node: usize,
    },
}

impl Tree {
    fn goes_yes(&self, x: &[f32], feature: usize, threshold: f32, missing_yes: bool) -> bool {
        let v = x[feature];
        if v.is_nan() {
            missing_yes
        } else {
            v <= threshold
        }
    }

    /// The raw value of the leaf `x` reaches.
    pub fn predict(&self, x: &[f32]) -> f64 {
        let mut i = self.root;
        loop {
            match &self.nodes[i] {
                Node::Leaf { value, .. } => return *value,
                Node::Split {
                    feature,
                    threshold,
                    yes,
                    no,
                    missing_yes,
                    ..
                } => {
                    i = if self.goes_yes(x, *feature, *threshold, *missing_yes) {
                        *yes
                    } else {
                        *no
                    }
                }
            }
        }
    }

    /// The cover-weighted mean of the leaves: the tree's value when no feature is known.
    pub fn expected(&self) -> f64 {
        let root = self.nodes[self.root].cover();
        self.nodes
            .iter()
            .filter_map(|n| match n {
                Node::Leaf { value, cover } if root > 0.0 => Some(value * cover / root),
                _ => None,
            })
            .sum()
    }
}

/// A tree ensemble whose raw score is the sum of its trees' leaves plus `base`.
#[derive(Debug, Clone, PartialEq)]
pub struct Explainer {
    trees: Vec<Tree>,
    base: f64,
    width: usize,
    expected: f64,
    /// Precomputed contributions per leaf and per pattern of followed path features;
    /// `None` when a path has too many distinct features for tables.
    tables: Option<Vec<LeafTable>>,
    /// Each tree's contributions for every combination of directions at its splits, built
    /// from the leaf tables; `None` when a tree has more than [`MAX_TREE_SPLITS`] splits.
    tree_tables: Option<Vec<TreeTable>>,
}

/// Most splits in one tree for which a per-tree table is built (2^s rows of `width`).
const MAX_TREE_SPLITS: usize = 10;

/// One tree's contributions by the row's directions at its splits: bit `b` of the index
/// is whether the row goes `yes` at `splits[b]`. A row costs the tree's comparisons and
/// one row of adds.
#[derive(Debug, Clone, PartialEq)]
struct TreeTable {
    /// The test at each split, in bit order, as columns: the feature, the threshold, and
    /// whether a missing value goes `yes`.
    features: Vec<usize>,
    thresholds: Vec<f32>,
    missing_yes: Vec<bool>,
    /// `values[mask * width + f]`.
    values: Vec<f64>,
}

impl TreeTable {
    /// The row's directions at this tree's splits, one bit each, without branches.
    #[inline]
    fn mask(&self, x: &[f32]) -> usize {
        let mut mask = 0usize;
        for (b, ((&f, &t), &m)) in self
            .features
            .iter()
            .zip(&self.thresholds)
            .zip(&self.missing_yes)
            .enumerate()
        {
            let v = x[f];
            let yes = (v <= t) | (v.is_nan() & m);
            mask |= usize::from(yes) << b;
        }
        mask
    }

    /// Adds this tree's contributions for row `x` to `phi`.
    fn add(&self, x: &[f32], phi: &mut [f64]) {
        let mask = self.mask(x);
        let width = phi.len();
        let row = &self.values[mask * width..(mask + 1) * width];
        for (p, v) in phi.iter_mut().zip(row) {
            *p += v;
        }
    }
}

/// The per-tree tables, from the leaf tables (`None` if a tree has too many splits).
fn tree_tables(trees: &[Tree], leaves: &[LeafTable], width: usize) -> Option<Vec<TreeTable>> {
    let mut out = Vec::with_capacity(trees.len());
    for (t, tree) in trees.iter().enumerate() {
        let splits: Vec<usize> = tree
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| matches!(n, Node::Split { .. }))
            .map(|(i, _)| i)
            .collect();
        if splits.len() > MAX_TREE_SPLITS {
            return None;
        }
        let bit_of = |node: usize| splits.iter().position(|s| *s == node).unwrap_or(0);
        let mut values = vec![0.0; (1usize << splits.len()) * width];
        let mine: Vec<&LeafTable> = leaves.iter().filter(|l| l.tree == t).collect();
        for mask in 0..(1usize << splits.len()) {
            let row = &mut values[mask * width..(mask + 1) * width];
            for leaf in &mine {
                let mut followed: usize = (1usize << leaf.features.len()) - 1;
                for &(node, takes_yes, bit) in &leaf.steps {
                    if (mask >> bit_of(node) & 1 == 1) != takes_yes {
                        followed &= !(1usize << bit);
                    }
                }
                let k = leaf.features.len();
                for (f, v) in leaf
                    .features
                    .iter()
                    .zip(&leaf.values[followed * k..(followed + 1) * k])
                {
                    row[*f] += v;
                }
            }
        }
        let tests: Vec<(usize, f32, bool)> = splits
            .iter()
            .filter_map(|&node| match &tree.nodes[node] {
                Node::Split {
                    feature,
                    threshold,
                    missing_yes,
                    ..
                } => Some((*feature, *threshold, *missing_yes)),
                Node::Leaf { .. } => None,
            })
            .collect();
        out.push(TreeTable {
            features: tests.iter().map(|t| t.0).collect(),
            thresholds: tests.iter().map(|t| t.1).collect(),
            missing_yes: tests.iter().map(|t| t.2).collect(),
            values,
        });
    }
    Some(out)
}

/// Most distinct features on one root-to-leaf path for which a leaf's table is built
/// (2^k patterns of k contributions each).
const MAX_TABLE_FEATURES: usize = 12;

/// One leaf's contributions for every pattern of which of its path features the row follows.
///
/// A leaf's share of the contributions depends on the row only through that pattern: for
/// each distinct feature on its path, whether the row takes the path's direction at every
/// split on that feature. The zero fractions (cover ratios) and the leaf value are fixed,
/// so the path-dependent algorithm's leaf step is evaluated once per pattern here
/// (Fast TreeSHAP's second variant) and a row costs one lookup per leaf.
#[derive(Debug, Clone, PartialEq)]
struct LeafTable {
    tree: usize,
    /// The path's splits: (node, whether the path takes `yes`, the pattern bit).
    steps: Vec<(usize, bool, u8)>,
    /// The distinct features, in pattern-bit order.
    features: Vec<usize>,
    /// `values[pattern * features.len() + k]`: the contribution to `features[k]`.
    values: Vec<f64>,
}

#[derive(Debug, Clone, Copy)]
struct PathElement {
    feature: Option<usize>,
    zero: f64,
    one: f64,
    weight: f64,
}

impl Explainer {
    /// Checks the trees (children in range, no cycle, splits on features `< width`, covers
    /// on every node) and computes the expected value.
    pub fn new(trees: Vec<Tree>, base: f64, width: usize) -> Result<Self, Error> {
        for (t, tree) in trees.iter().enumerate() {
            let bad = |reason: String| Error::Malformed { tree: t, reason };
            if tree.root >= tree.nodes.len() {
                return Err(bad(format!("root {} outside the tree", tree.root)));
            }
            let mut stack = vec![(tree.root, 0usize)];
            while let Some((i, depth)) = stack.pop() {
                if depth > tree.nodes.len() {
                    return Err(bad("a cycle".into()));
                }
                let node = tree
                    .nodes
                    .get(i)
                    .ok_or_else(|| bad(format!("child {i} outside the tree")))?;
                if node.cover() <= 0.0 || !node.cover().is_finite() {
                    return Err(Error::NoCover { tree: t, node: i });
                }
                if let Node::Split {
                    feature, yes, no, ..
                } = node
                {
                    if *feature >= width {
                        return Err(bad(format!("split on feature {feature} of {width}")));
                    }
                    stack.push((*yes, depth + 1));
                    stack.push((*no, depth + 1));
                }
            }
        }
        let expected = base + trees.iter().map(Tree::expected).sum::<f64>();
        let tables = leaf_tables(&trees);
        let tree_tables = tables
            .as_deref()
            .and_then(|leaves| tree_tables(&trees, leaves, width));
        Ok(Self {
            trees,
            base,
            width,
            expected,
            tables,
            tree_tables,
        })
    }

    /// The raw score no feature explains: `base` plus every tree's expected value.
    pub fn expected_value(&self) -> f64 {
        self.expected
    }

    /// Features per row.
    pub fn width(&self) -> usize {
        self.width
    }

    /// The raw score of `x` (`base` plus the leaves it reaches).
    pub fn predict(&self, x: &[f32]) -> f64 {
        self.base + self.trees.iter().map(|t| t.predict(x)).sum::<f64>()
    }

    /// Each feature's contribution to the raw score of `x` (`x.len()` must be the width):
    /// they sum, with [`Self::expected_value`], to [`Self::predict`].
    pub fn contributions(&self, x: &[f32]) -> Vec<f64> {
        let mut phi = vec![0.0; self.width];
        if x.len() != self.width {
            return phi;
        }
        if let Some(tables) = &self.tree_tables {
            for t in tables {
                t.add(x, &mut phi);
            }
            return phi;
        }
        if let Some(tables) = &self.tables {
            // Where the row goes at every split of the current tree, one bit per node.
            let (mut current, mut yes_mask) = (usize::MAX, 0u64);
            for t in tables {
                if t.tree != current {
                    current = t.tree;
                    let tree = &self.trees[current];
                    yes_mask = 0;
                    for (i, n) in tree.nodes.iter().enumerate() {
                        if let Node::Split {
                            feature,
                            threshold,
                            missing_yes,
                            ..
                        } = n
                            && tree.goes_yes(x, *feature, *threshold, *missing_yes)
                        {
                            yes_mask |= 1 << i;
                        }
                    }
                }
                let mut followed: u32 = (1u32 << t.features.len()) - 1;
                for &(node, takes_yes, bit) in &t.steps {
                    if (yes_mask >> node & 1 == 1) != takes_yes {
                        followed &= !(1u32 << bit);
                    }
                }
                let k = t.features.len();
                let row = &t.values[followed as usize * k..(followed as usize + 1) * k];
                for (f, v) in t.features.iter().zip(row) {
                    phi[*f] += v;
                }
            }
            return phi;
        }
        self.contributions_recursive(x, &mut phi);
        phi
    }

    /// The contributions of `n` rows (row-major, `n * width` values; empty when `rows` is
    /// not a whole number of rows): `n * width` values, row by row, each equal to
    /// [`Self::contributions`] of its row. With per-tree tables, rows are taken in blocks
    /// and each tree's table is read once per block, so it stays in cache.
    pub fn contributions_batch(&self, rows: &[f32]) -> Vec<f64> {
        let width = self.width;
        if width == 0 || !rows.len().is_multiple_of(width) {
            return Vec::new();
        }
        let mut phi = vec![0.0; rows.len()];
        match &self.tree_tables {
            Some(tables) => {
                macro_rules! fixed {
                    ($($w:literal)*) => {
                        match width {
                            $($w => blocks::<$w>(tables, rows, &mut phi),)*
                            _ => blocks_any(tables, rows, &mut phi, width),
                        }
                    };
                }
                fixed!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16);
            }
            None => {
                for (x, p) in rows.chunks(width).zip(phi.chunks_mut(width)) {
                    p.copy_from_slice(&self.contributions(x));
                }
            }
        }
        phi
    }

    /// The path-dependent algorithm walked for `x` (no tables): the reference the tables
    /// are checked against.
    pub fn contributions_walked(&self, x: &[f32]) -> Vec<f64> {
        let mut phi = vec![0.0; self.width];
        if x.len() == self.width {
            self.contributions_recursive(x, &mut phi);
        }
        phi
    }

    fn contributions_recursive(&self, x: &[f32], phi: &mut [f64]) {
        let mut buf: Vec<PathElement> = Vec::with_capacity(256);
        for tree in &self.trees {
            recurse(tree, x, tree.root, &mut buf, (0, 0), 1.0, 1.0, None, phi);
        }
    }
}

/// Rows per block of the batch path: a tree's table is read once per block.
const BLOCK: usize = 128;

/// The batch path for a width known at compile time. The block is transposed to columns so
/// each split's direction is computed for all its rows in one vectorisable loop; then each
/// row adds the table row its directions pick.
fn blocks<const W: usize>(tables: &[TreeTable], rows: &[f32], phi: &mut [f64]) {
    let mut columns = vec![0.0f32; W * BLOCK];
    let mut masks = [0u16; BLOCK];
    for (block, out) in rows.chunks(BLOCK * W).zip(phi.chunks_mut(BLOCK * W)) {
        let n = block.len() / W;
        for (r, x) in block.chunks_exact(W).enumerate() {
            for (f, v) in x.iter().enumerate() {
                columns[f * BLOCK + r] = *v;
            }
        }
        for t in tables {
            let masks = &mut masks[..n];
            masks.fill(0);
            for (b, ((&f, &threshold), &missing_yes)) in t
                .features
                .iter()
                .zip(&t.thresholds)
                .zip(&t.missing_yes)
                .enumerate()
            {
                let column = &columns[f * BLOCK..f * BLOCK + n];
                for (m, &v) in masks.iter_mut().zip(column) {
                    let yes = (v <= threshold) | (v.is_nan() & missing_yes);
                    *m |= u16::from(yes) << b;
                }
            }
            for (&mask, p) in masks.iter().zip(out.chunks_exact_mut(W)) {
                let mask = usize::from(mask);
                if let (Some(row), Ok(p)) = (
                    t.values
                        .get(mask * W..(mask + 1) * W)
                        .and_then(|r| <&[f64; W]>::try_from(r).ok()),
                    <&mut [f64; W]>::try_from(p),
                ) {
                    for (p, v) in p.iter_mut().zip(row) {
                        *p += v;
                    }
                }
            }
        }
    }
}

/// The batch path for any width.
fn blocks_any(tables: &[TreeTable], rows: &[f32], phi: &mut [f64], width: usize) {
    for (block, out) in rows
        .chunks(BLOCK * width)
        .zip(phi.chunks_mut(BLOCK * width))
    {
        for t in tables {
            for (x, p) in block.chunks(width).zip(out.chunks_mut(width)) {
                t.add(x, p);
            }
        }
    }
}

/// Every leaf's table, or `None` if a path has more than [`MAX_TABLE_FEATURES`] features
/// or a tree more than 64 nodes.
fn leaf_tables(trees: &[Tree]) -> Option<Vec<LeafTable>> {
    let mut out = Vec::new();
    for (t, tree) in trees.iter().enumerate() {
        // A row's directions are kept as one bit per node.
        if tree.nodes.len() > 64 {
            return None;
        }
        // Depth-first: (node, path so far as (split node, takes yes)).
        let mut stack: Vec<(usize, Vec<(usize, bool)>)> = vec![(tree.root, Vec::new())];
        while let Some((i, path)) = stack.pop() {
            match &tree.nodes[i] {
                Node::Split { yes, no, .. } => {
                    let mut y = path.clone();
                    y.push((i, true));
                    stack.push((*yes, y));
                    let mut n = path;
                    n.push((i, false));
                    stack.push((*no, n));
                }
                Node::Leaf { value, .. } => {
                    out.push(leaf_table(tree, t, &path, *value)?);
                }
            }
        }
    }
    Some(out)
}

fn leaf_table(tree: &Tree, t: usize, path: &[(usize, bool)], value: f64) -> Option<LeafTable> {
    // Each distinct feature's zero fraction: the product of the path's cover ratios on it.
    let mut features: Vec<usize> = Vec::new();
    let mut zeros: Vec<f64> = Vec::new();
    let mut steps = Vec::with_capacity(path.len());
    for &(node, takes_yes) in path {
        let Node::Split {
            feature,
            yes,
            no,
            cover,
            ..
        } = &tree.nodes[node]
        else {
            continue;
        };
        let child = if takes_yes { *yes } else { *no };
        let ratio = tree.nodes[child].cover() / cover;
        let bit = match features.iter().position(|f| f == feature) {
            Some(b) => {
                zeros[b] *= ratio;
                b
            }
            None => {
                features.push(*feature);
                zeros.push(ratio);
                features.len() - 1
            }
        };
        steps.push((node, takes_yes, bit as u8));
    }
    let k = features.len();
    if k > MAX_TABLE_FEATURES {
        return None;
    }
    let mut values = vec![0.0; (1usize << k) * k];
    let mut buf: Vec<PathElement> = Vec::with_capacity(k + 1);
    for pattern in 0..(1usize << k) {
        buf.clear();
        extend(&mut buf, 0, 1.0, 1.0, None);
        for (b, z) in zeros.iter().enumerate() {
            let one = if pattern & (1 << b) != 0 { 1.0 } else { 0.0 };
            extend(&mut buf, 0, *z, one, Some(b));
        }
        for i in 1..buf.len() {
            let w = unwound_sum(&buf, i);
            let el = buf[i];
            if let Some(b) = el.feature {
                values[pattern * k + b] += w * (el.one - el.zero) * value;
            }
        }
    }
    Some(LeafTable {
        tree: t,
        steps,
        features,
        values,
    })
}

/// Extends the path `buf[start..]` (at the end of `buf`) by one element.
fn extend(buf: &mut Vec<PathElement>, start: usize, zero: f64, one: f64, feature: Option<usize>) {
    let depth = buf.len() - start;
    buf.push(PathElement {
        feature,
        zero,
        one,
        weight: if depth == 0 { 1.0 } else { 0.0 },
    });
    let path = &mut buf[start..];
    for i in (0..depth).rev() {
        path[i + 1].weight += one * path[i].weight * (i + 1) as f64 / (depth + 1) as f64;
        path[i].weight = zero * path[i].weight * (depth - i) as f64 / (depth + 1) as f64;
    }
}

/// Removes element `index` of the path `buf[start..]` (at the end of `buf`).
fn unwind(buf: &mut Vec<PathElement>, start: usize, index: usize) {
    let path = &mut buf[start..];
    let depth = path.len() - 1;
    let (one, zero) = (path[index].one, path[index].zero);
    let mut next = path[depth].weight;
    for i in (0..depth).rev() {
        if one != 0.0 {
            let tmp = path[i].weight;
            path[i].weight = next * (depth + 1) as f64 / ((i + 1) as f64 * one);
            next = tmp - path[i].weight * zero * (depth - i) as f64 / (depth + 1) as f64;
        } else {
            path[i].weight = path[i].weight * (depth + 1) as f64 / (zero * (depth - i) as f64);
        }
    }
    for i in index..depth {
        path[i].feature = path[i + 1].feature;
        path[i].zero = path[i + 1].zero;
        path[i].one = path[i + 1].one;
    }
    buf.pop();
}

fn unwound_sum(path: &[PathElement], index: usize) -> f64 {
    let depth = path.len() - 1;
    let (one, zero) = (path[index].one, path[index].zero);
    let mut next = path[depth].weight;
    let mut total = 0.0;
    for i in (0..depth).rev() {
        if one != 0.0 {
            let tmp = next * (depth + 1) as f64 / ((i + 1) as f64 * one);
            total += tmp;
            next = path[i].weight - tmp * zero * (depth - i) as f64 / (depth + 1) as f64;
        } else if zero != 0.0 {
            total += path[i].weight / zero / ((depth - i) as f64 / (depth + 1) as f64);
        }
    }
    total
}

/// One node of the walk. The paths of all levels live in `buf`, each after its parent's
/// (`parent` is the parent's range): no allocation once `buf` has grown to the depth.
#[allow(clippy::too_many_arguments)]
fn recurse(
    tree: &Tree,
    x: &[f32],
    node: usize,
    buf: &mut Vec<PathElement>,
    parent: (usize, usize),
    zero: f64,
    one: f64,
    feature: Option<usize>,
    phi: &mut [f64],
) {
    let start = buf.len();
    buf.extend_from_within(parent.0..parent.1);
    extend(buf, start, zero, one, feature);
    match &tree.nodes[node] {
        Node::Leaf { value, .. } => {
            let path = &buf[start..];
            for i in 1..path.len() {
                let w = unwound_sum(path, i);
                let el = path[i];
                if let Some(f) = el.feature {
                    phi[f] += w * (el.one - el.zero) * value;
                }
            }
        }
        Node::Split {
            feature: split,
            threshold,
            yes,
            no,
            missing_yes,
            cover,
        } => {
            let (hot, cold) = if tree.goes_yes(x, *split, *threshold, *missing_yes) {
                (*yes, *no)
            } else {
                (*no, *yes)
            };
            let hot_zero = tree.nodes[hot].cover() / cover;
            let cold_zero = tree.nodes[cold].cover() / cover;
            let (mut in_zero, mut in_one) = (1.0, 1.0);
            // A feature split on again above: undo that split, to redo it here.
            if let Some(k) = buf[start..].iter().position(|e| e.feature == Some(*split)) {
                in_zero = buf[start + k].zero;
                in_one = buf[start + k].one;
                unwind(buf, start, k);
            }
            let here = (start, buf.len());
            recurse(
                tree,
                x,
                hot,
                buf,
                here,
                hot_zero * in_zero,
                in_one,
                Some(*split),
                phi,
            );
            recurse(
                tree,
                x,
                cold,
                buf,
                here,
                cold_zero * in_zero,
                0.0,
                Some(*split),
                phi,
            );
        }
    }
    buf.truncate(start);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// The tree's value when only the features in `known` are known: a split on an unknown
    /// feature averages its children by cover (the path-dependent conditional expectation).
    fn value_knowing(tree: &Tree, x: &[f32], node: usize, known: u32) -> f64 {
        match &tree.nodes[node] {
            Node::Leaf { value, .. } => *value,
            Node::Split {
                feature,
                threshold,
                yes,
                no,
                missing_yes,
                cover,
            } => {
                if known & (1 << feature) != 0 {
                    let next = if tree.goes_yes(x, *feature, *threshold, *missing_yes) {
                        *yes
                    } else {
                        *no
                    };
                    value_knowing(tree, x, next, known)
                } else {
                    (tree.nodes[*yes].cover() * value_knowing(tree, x, *yes, known)
                        + tree.nodes[*no].cover() * value_knowing(tree, x, *no, known))
                        / cover
                }
            }
        }
    }

    /// Shapley values by enumerating every coalition.
    fn brute_force(trees: &[Tree], x: &[f32], width: usize) -> Vec<f64> {
        let v = |s: u32| -> f64 {
            trees
                .iter()
                .map(|t| value_knowing(t, x, t.root, s))
                .sum::<f64>()
        };
        let fact = |n: usize| (1..=n).map(|k| k as f64).product::<f64>();
        let mut phi = vec![0.0; width];
        for (i, p) in phi.iter_mut().enumerate() {
            for s in 0..(1u32 << width) {
                if s & (1 << i) != 0 {
                    continue;
                }
                let size = s.count_ones() as usize;
                let weight = fact(size) * fact(width - size - 1) / fact(width);
                *p += weight * (v(s | (1 << i)) - v(s));
            }
        }
        phi
    }

    /// xorshift64, for reproducible random trees and rows.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn unit(&mut self) -> f64 {
            (self.next() >> 11) as f64 / (1u64 << 53) as f64
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// A random tree of depth up to `depth` over `width` features, covers adding up.
    fn random_tree(rng: &mut Rng, width: usize, depth: usize) -> Tree {
        fn grow(
            rng: &mut Rng,
            nodes: &mut Vec<Node>,
            width: usize,
            depth: usize,
            cover: f64,
        ) -> usize {
            let i = nodes.len();
            nodes.push(Node::Leaf { value: 0.0, cover });
            if depth == 0 || (rng.unit() < 0.2 && i > 0) {
                nodes[i] = Node::Leaf {
                    value: rng.unit() * 2.0 - 1.0,
                    cover,
                };
                return i;
            }
            let share = 0.1 + 0.8 * rng.unit();
            let feature = rng.below(width);
            let threshold = (rng.unit() * 10.0) as f32;
            let missing_yes = rng.unit() < 0.5;
            let yes = grow(rng, nodes, width, depth - 1, cover * share);
            let no = grow(rng, nodes, width, depth - 1, cover * (1.0 - share));
            nodes[i] = Node::Split {
                feature,
                threshold,
                yes,
                no,
                missing_yes,
                cover,
            };
            i
        }
        let mut nodes = Vec::new();
        let root = grow(rng, &mut nodes, width, depth, 1000.0);
        Tree { nodes, root }
    }

    #[test]
    fn tree_shap_equals_the_shapley_values_of_the_path_dependent_expectation() {
        let mut rng = Rng(0x5eed_cafe);
        for case in 0..60 {
            let width = 2 + case % 6;
            let trees: Vec<Tree> = (0..1 + case % 4)
                .map(|_| random_tree(&mut rng, width, 1 + case % 6))
                .collect();
            let explainer = Explainer::new(trees.clone(), 0.25, width).unwrap();
            let x: Vec<f32> = (0..width)
                .map(|_| {
                    if rng.unit() < 0.15 {
                        f32::NAN
                    } else {
                        (rng.unit() * 10.0) as f32
                    }
                })
                .collect();
            let phi = explainer.contributions(&x);
            let walked = explainer.contributions_walked(&x);
            for (f, (a, b)) in phi.iter().zip(&walked).enumerate() {
                assert!(
                    (a - b).abs() < 1e-9,
                    "case {case}, feature {f}: table {a} vs walk {b}"
                );
            }
            let want = brute_force(&trees, &x, width);
            for (f, (got, want)) in phi.iter().zip(&want).enumerate() {
                assert!(
                    (got - want).abs() < 1e-9,
                    "case {case}, feature {f}: {got} vs {want}"
                );
            }
            // Local accuracy: the contributions and the expected value make the raw score.
            let total = explainer.expected_value() + phi.iter().sum::<f64>();
            assert!(
                (total - explainer.predict(&x)).abs() < 1e-9,
                "case {case}: {total} vs {}",
                explainer.predict(&x)
            );
        }
    }

    #[test]
    fn a_batch_gets_each_rows_contributions_across_block_edges() {
        let mut rng = Rng(0xb10c_5eed);
        // Deep trees (no per-tree tables) and shallow ones (tables; widths with and without
        // a fixed-width path), 150 rows: more than one block, the last one partial.
        for (depth, width) in [(3, 5), (3, 17), (7, 5), (12, 5)] {
            let trees: Vec<Tree> = (0..6)
                .map(|_| random_tree(&mut rng, width, depth))
                .collect();
            let explainer = Explainer::new(trees, -0.5, width).unwrap();
            let rows: Vec<f32> = (0..150 * width)
                .map(|_| {
                    if rng.unit() < 0.1 {
                        f32::NAN
                    } else {
                        (rng.unit() * 10.0) as f32
                    }
                })
                .collect();
            let batch = explainer.contributions_batch(&rows);
            assert_eq!(batch.len(), rows.len());
            for (r, (x, got)) in rows.chunks(width).zip(batch.chunks(width)).enumerate() {
                let want = explainer.contributions(x);
                for (a, b) in got.iter().zip(&want) {
                    assert!(
                        (a - b).abs() < 1e-12,
                        "depth {depth} row {r}: {got:?} vs {want:?}"
                    );
                }
            }
            assert!(
                explainer.contributions_batch(&rows[..7]).is_empty(),
                "a partial row"
            );
        }
    }

    #[test]
    fn a_feature_the_trees_never_split_on_gets_nothing() {
        let mut rng = Rng(7);
        let tree = random_tree(&mut rng, 3, 4);
        let explainer = Explainer::new(vec![tree], 0.0, 5).unwrap();
        let phi = explainer.contributions(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!((phi[3], phi[4]), (0.0, 0.0));
    }

    #[test]
    fn malformed_trees_are_refused_with_the_reason() {
        let leaf = |cover: f64| Node::Leaf { value: 1.0, cover };
        let split = |feature: usize, yes: usize, no: usize| Node::Split {
            feature,
            threshold: 0.5,
            yes,
            no,
            missing_yes: true,
            cover: 2.0,
        };
        let tree = |nodes: Vec<Node>| Tree { nodes, root: 0 };
        assert!(matches!(
            Explainer::new(vec![tree(vec![split(0, 1, 9), leaf(1.0)])], 0.0, 1),
            Err(Error::Malformed { .. })
        ));
        assert!(matches!(
            Explainer::new(
                vec![tree(vec![split(4, 1, 2), leaf(1.0), leaf(1.0)])],
                0.0,
                2
            ),
            Err(Error::Malformed { .. })
        ));
        assert!(matches!(
            Explainer::new(vec![tree(vec![split(0, 0, 1), leaf(1.0)])], 0.0, 1),
            Err(Error::Malformed { .. })
        ));
        assert_eq!(
            Explainer::new(
                vec![tree(vec![split(0, 1, 2), leaf(0.0), leaf(1.0)])],
                0.0,
                1
            ),
            Err(Error::NoCover { tree: 0, node: 1 })
        );
    }
}
