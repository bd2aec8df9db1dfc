//! Native evaluation of a tree-ensemble ONNX graph (the LightGBM export), in Rust.
//!
//! ONNX stays the model contract: the trees are read from the graph's one
//! `ai.onnx.ml.TreeEnsembleClassifier` node into flat arrays and evaluated here with ONNX
//! Runtime's semantics (the comparison of each node's mode, a missing value following its
//! `missing_value_tracks_true`, leaf weights summed per class in tree order in `f32`, then
//! the post-transform). Only the graphs this covers are taken: a binary classifier whose
//! leaves all add to one class, modes `BRANCH_*`/`LEAF`, post-transform `NONE` or
//! `LOGISTIC`, and nothing but `Identity` after it. Anything else returns `None` and the
//! model is scored by ONNX Runtime. [`crate::Model`] also checks the two agree on probe rows
//! before it uses the native path.

use std::collections::HashMap;

use prost::Message;

/// The parts of `onnx.proto` read here (field numbers as in the ONNX IR); the rest is
/// skipped by the decoder.
mod proto {
    /// `ModelProto`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct ModelProto {
        /// `graph`.
        #[prost(message, optional, tag = "7")]
        pub(super) graph: Option<GraphProto>,
    }

    /// `GraphProto`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct GraphProto {
        /// `node`.
        #[prost(message, repeated, tag = "1")]
        pub(super) node: Vec<NodeProto>,
        /// `input`.
        #[prost(message, repeated, tag = "11")]
        pub(super) input: Vec<ValueInfoProto>,
        /// `output`.
        #[prost(message, repeated, tag = "12")]
        pub(super) output: Vec<ValueInfoProto>,
    }

    /// `ValueInfoProto` (its name only).
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct ValueInfoProto {
        /// `name`.
        #[prost(string, tag = "1")]
        pub(super) name: String,
    }

    /// `NodeProto`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct NodeProto {
        /// `input`.
        #[prost(string, repeated, tag = "1")]
        pub(super) input: Vec<String>,
        /// `output`.
        #[prost(string, repeated, tag = "2")]
        pub(super) output: Vec<String>,
        /// `op_type`.
        #[prost(string, tag = "4")]
        pub(super) op_type: String,
        /// `attribute`.
        #[prost(message, repeated, tag = "5")]
        pub(super) attribute: Vec<AttributeProto>,
        /// `domain`.
        #[prost(string, tag = "7")]
        pub(super) domain: String,
    }

    /// `AttributeProto` (the value kinds a tree ensemble uses).
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct AttributeProto {
        /// `name`.
        #[prost(string, tag = "1")]
        pub(super) name: String,
        /// `f`.
        #[prost(float, tag = "2")]
        pub(super) f: f32,
        /// `i`.
        #[prost(int64, tag = "3")]
        pub(super) i: i64,
        /// `s`.
        #[prost(bytes = "vec", tag = "4")]
        pub(super) s: Vec<u8>,
        /// `floats`.
        #[prost(float, repeated, tag = "7")]
        pub(super) floats: Vec<f32>,
        /// `ints`.
        #[prost(int64, repeated, tag = "8")]
        pub(super) ints: Vec<i64>,
        /// `strings`.
        #[prost(bytes = "vec", repeated, tag = "9")]
        pub(super) strings: Vec<Vec<u8>>,
    }
}

const LEAF: u8 = 0;
const LEQ: u8 = 1;
const LT: u8 = 2;
const GTE: u8 = 3;
const GT: u8 = 4;
const EQ: u8 = 5;
const NEQ: u8 = 6;

/// One node; for a leaf, `weight` is what it adds and the rest is unused.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Node {
    threshold: f32,
    weight: f32,
    next_true: u32,
    next_false: u32,
    feature: u16,
    mode: u8,
    missing_true: bool,
}

/// How the summed leaf weights become the positive class's probability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Post {
    None,
    Logistic,
}

/// Marks a child reference as a leaf (the rest is the leaf's index).
const LEAF_BIT: u32 = 1 << 31;

/// A branch as evaluated: 16 bytes; `next[0]` is taken when the comparison holds (or the
/// value is missing and `missing_true`), `next[1]` otherwise; a reference with
/// [`LEAF_BIT`] is a leaf.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Branch {
    threshold: f32,
    feature: u16,
    mode: u8,
    missing_true: bool,
    next: [u32; 2],
}

/// The trees laid out so that several walks advance together: a leaf is a node whose two
/// children are itself, so every walk of a tree takes exactly its depth in steps and
/// independent walks (of rows, or of trees) overlap in the CPU instead of waiting on one
/// chain of dependent loads.
#[derive(Debug, Clone, PartialEq)]
struct Lockstep {
    nodes: Vec<Branch>,
    /// A leaf's weight by node (0 for branches).
    value: Vec<f32>,
    roots: Vec<u32>,
    /// Branch levels of each tree's deepest path.
    depth: Vec<u32>,
}

/// Walks advanced together.
const LANES: usize = 8;

impl Lockstep {
    fn build(nodes: &[Node], roots: &[u32]) -> Self {
        let mut steps = Vec::with_capacity(nodes.len());
        let mut value = Vec::with_capacity(nodes.len());
        for (i, n) in nodes.iter().enumerate() {
            let me = i as u32;
            steps.push(Branch {
                threshold: n.threshold,
                feature: n.feature,
                mode: n.mode,
                missing_true: n.missing_true,
                next: if n.mode == LEAF {
                    [me, me]
                } else {
                    [n.next_true, n.next_false]
                },
            });
            value.push(if n.mode == LEAF { n.weight } else { 0.0 });
        }
        let depth = roots
            .iter()
            .map(|&r| {
                let mut deepest = 0;
                let mut stack = vec![(r, 0u32)];
                while let Some((i, d)) = stack.pop() {
                    let n = &nodes[i as usize];
                    if n.mode == LEAF {
                        deepest = deepest.max(d);
                    } else {
                        stack.push((n.next_true, d + 1));
                        stack.push((n.next_false, d + 1));
                    }
                }
                deepest
            })
            .collect();
        Self {
            nodes: steps,
            value,
            roots: roots.to_vec(),
            depth,
        }
    }

    #[inline(always)]
    fn step(&self, c: u32, row: &[f32]) -> u32 {
        let b = &self.nodes[c as usize];
        let x = row[b.feature as usize];
        let to_true = (x <= b.threshold) | (b.missing_true & x.is_nan());
        b.next[usize::from(!to_true)]
    }

    /// Adds every tree's leaf weight to `sums`, one per row of `rows`, trees in order:
    /// [`LANES`] rows walk each tree together.
    fn add(&self, rows: &[f32], width: usize, sums: &mut [f32]) {
        for (chunk, out) in rows.chunks(LANES * width).zip(sums.chunks_mut(LANES)) {
            let lanes = out.len();
            let mut r: [&[f32]; LANES] = [&[]; LANES];
            for (k, row) in chunk.chunks_exact(width).enumerate() {
                r[k] = row;
            }
            let mut acc = [0.0f32; LANES];
            for (&root, &depth) in self.roots.iter().zip(&self.depth) {
                let mut c = [root; LANES];
                for _ in 0..depth {
                    for k in 0..lanes {
                        c[k] = self.step(c[k], r[k]);
                    }
                }
                for k in 0..lanes {
                    acc[k] += self.value[c[k] as usize];
                }
            }
            for (o, a) in out.iter_mut().zip(acc) {
                *o += a;
            }
        }
    }

    /// One row's summed leaf weights: [`LANES`] trees walk together, summed in tree order.
    fn sum_row(&self, row: &[f32]) -> f32 {
        let mut sum = 0.0f32;
        for (roots, depths) in self.roots.chunks(LANES).zip(self.depth.chunks(LANES)) {
            let mut c = [0u32; LANES];
            c[..roots.len()].copy_from_slice(roots);
            let depth = depths.iter().copied().max().unwrap_or(0);
            for _ in 0..depth {
                for ck in c.iter_mut().take(roots.len()) {
                    *ck = self.step(*ck, row);
                }
            }
            for ck in c.iter().take(roots.len()) {
                sum += self.value[*ck as usize];
            }
        }
        sum
    }
}

/// A tree's leaves as bits, leftmost (reached by taking every comparison's true side) in
/// bit 0; the width is chosen by the ensemble's largest tree.
trait Leaves: Copy + std::ops::BitAnd<Output = Self> + std::ops::Not<Output = Self> {
    const ALL: Self;
    const NONE: Self;
    const BITS: usize;
    fn bit(i: usize) -> Self;
    fn or(self, other: Self) -> Self;
    fn lowest(self) -> usize;
}

macro_rules! leaves {
    ($($t:ty),*) => {$(
        impl Leaves for $t {
            const ALL: Self = <$t>::MAX;
            const NONE: Self = 0;
            const BITS: usize = <$t>::BITS as usize;
            fn bit(i: usize) -> Self {
                1 << i
            }
            fn or(self, other: Self) -> Self {
                self | other
            }
            #[inline(always)]
            fn lowest(self) -> usize {
                self.trailing_zeros() as usize
            }
        }
    )*};
}
leaves!(u8, u16, u32, u64);

/// The nodes of one kind, grouped by feature: `nodes[start[f]..start[f + 1]]`.
#[derive(Debug, Clone, PartialEq)]
struct ByFeature<W> {
    start: Vec<u32>,
    threshold: Vec<f32>,
    tree: Vec<u32>,
    /// The leaves of the node's true subtree: the ones a row that takes its false side
    /// cannot reach.
    left: Vec<W>,
}

impl<W: Leaves> ByFeature<W> {
    /// `nodes` as (feature, threshold, tree, left), grouped by feature, by threshold within.
    fn build(mut nodes: Vec<(u16, f32, u32, W)>, width: usize) -> Self {
        nodes.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
        let mut start = vec![0u32; width + 1];
        for n in &nodes {
            start[n.0 as usize + 1] += 1;
        }
        for f in 0..width {
            start[f + 1] += start[f];
        }
        Self {
            start,
            threshold: nodes.iter().map(|n| n.1).collect(),
            tree: nodes.iter().map(|n| n.2).collect(),
            left: nodes.iter().map(|n| n.3).collect(),
        }
    }

    fn of(&self, f: usize) -> std::ops::Range<usize> {
        self.start[f] as usize..self.start[f + 1] as usize
    }
}

/// All-`BRANCH_LEQ` trees of at most 64 leaves, evaluated the QuickScorer way (Lucchese et
/// al., SIGIR 2015) over blocks of rows: every tree of a row starts with all its leaves
/// possible; for each feature, the nodes whose threshold is below the row's value (sorted,
/// so a prefix, cut short at the block's largest value) rule out the leaves of their true
/// side; the exit leaf is then the leftmost left. No walk, so no chain of dependent loads,
/// and a block's rows are ruled on together, one node at a time.
#[derive(Debug, Clone, PartialEq)]
struct Quick<W> {
    /// Every branch, for a value that is present: it goes false when `x > threshold`.
    nodes: ByFeature<W>,
    /// The branches a missing value takes false (`missing_value_tracks_true` unset).
    missing_false: ByFeature<W>,
    /// Leaf weights by tree, leftmost first: tree `t`'s are `weights[first[t]..]`.
    weights: Vec<f32>,
    first: Vec<u32>,
}

/// Rows ruled on together.
const BLOCK: usize = 16;

impl<W: Leaves> Quick<W> {
    /// `None` when a tree has more leaves than `W` has bits, or a threshold is NaN (a node
    /// that every present value takes false does not fit the sorted prefix).
    fn build(nodes: &[Node], roots: &[u32], width: usize) -> Option<Self> {
        let (mut all, mut missing) = (Vec::new(), Vec::new());
        let (mut weights, mut first) = (Vec::new(), Vec::with_capacity(roots.len()));
        for (t, &root) in roots.iter().enumerate() {
            first.push(weights.len() as u32);
            let base = weights.len();
            // In order, true side first: leaf numbers rise left to right; a branch's true
            // subtree is the leaf range [from, to) numbered while it was open.
            let mut stack = vec![(root, false, 0usize)];
            while let Some((i, done, from)) = stack.pop() {
                let n = &nodes[i as usize];
                if n.mode == LEAF {
                    if weights.len() - base >= W::BITS {
                        return None;
                    }
                    weights.push(n.weight);
                } else if !done {
                    if n.threshold.is_nan() {
                        return None;
                    }
                    // After the true subtree: record it, then walk the false one.
                    stack.push((i, true, weights.len() - base));
                    stack.push((n.next_true, false, 0));
                } else {
                    let to = weights.len() - base;
                    let left = (from..to).fold(W::NONE, |m, b| m.or(W::bit(b)));
                    let node = (n.feature, n.threshold, t as u32, left);
                    all.push(node);
                    if !n.missing_true {
                        missing.push(node);
                    }
                    stack.push((n.next_false, false, 0));
                }
            }
        }
        Some(Self {
            nodes: ByFeature::build(all, width),
            missing_false: ByFeature::build(missing, width),
            weights,
            first,
        })
    }

    /// Adds every tree's leaf weight to `sums` (one per row of `rows`, at most `N` rows),
    /// trees in order; `v` is scratch.
    #[inline(always)]
    fn add_block<const N: usize>(
        &self,
        rows: &[f32],
        width: usize,
        sums: &mut [f32],
        v: &mut Vec<W>,
    ) {
        let n = sums.len();
        let trees = self.first.len();
        v.clear();
        v.resize(trees * N, W::ALL);
        for f in 0..width {
            let mut x = [f32::NEG_INFINITY; N];
            let mut missing = [false; N];
            let mut max = f32::NEG_INFINITY;
            for k in 0..n {
                let value = rows[k * width + f];
                if value.is_nan() {
                    missing[k] = true;
                } else {
                    x[k] = value;
                    max = max.max(value);
                }
            }
            let nodes = &self.nodes;
            for i in nodes.of(f) {
                let t = nodes.threshold[i];
                if t >= max {
                    break;
                }
                let (tree, left) = (nodes.tree[i] as usize, nodes.left[i]);
                let v = &mut v[tree * N..tree * N + N];
                for k in 0..N {
                    v[k] = v[k] & !(if x[k] > t { left } else { W::NONE });
                }
            }
            if missing.iter().any(|&m| m) {
                let nodes = &self.missing_false;
                for i in nodes.of(f) {
                    let (tree, left) = (nodes.tree[i] as usize, nodes.left[i]);
                    let v = &mut v[tree * N..tree * N + N];
                    for k in 0..N {
                        v[k] = v[k] & !(if missing[k] { left } else { W::NONE });
                    }
                }
            }
        }
        let mut acc = [0.0f32; N];
        for (tree, &first) in self.first.iter().enumerate() {
            let weights = &self.weights[first as usize..];
            for k in 0..n {
                acc[k] += weights[v[tree * N + k].lowest()];
            }
        }
        for (s, a) in sums.iter_mut().zip(acc) {
            *s += a;
        }
    }

    fn add(&self, rows: &[f32], width: usize, sums: &mut [f32]) {
        let mut v = Vec::new();
        for (chunk, out) in rows.chunks(BLOCK * width).zip(sums.chunks_mut(BLOCK)) {
            self.add_block::<BLOCK>(chunk, width, out, &mut v);
        }
    }

    fn sum_row(&self, row: &[f32]) -> f32 {
        let mut sum = [0.0f32];
        self.add_block::<1>(row, row.len(), &mut sum, &mut Vec::new());
        sum[0]
    }
}

/// [`Quick`] with the narrowest leaf bits that hold the largest tree.
#[derive(Debug, Clone, PartialEq)]
enum QuickAny {
    U8(Quick<u8>),
    U16(Quick<u16>),
    U32(Quick<u32>),
    U64(Quick<u64>),
}

impl QuickAny {
    fn build(nodes: &[Node], roots: &[u32], width: usize) -> Option<Self> {
        (Quick::build(nodes, roots, width).map(Self::U8))
            .or_else(|| Quick::build(nodes, roots, width).map(Self::U16))
            .or_else(|| Quick::build(nodes, roots, width).map(Self::U32))
            .or_else(|| Quick::build(nodes, roots, width).map(Self::U64))
    }

    fn add(&self, rows: &[f32], width: usize, sums: &mut [f32]) {
        match self {
            Self::U8(q) => q.add(rows, width, sums),
            Self::U16(q) => q.add(rows, width, sums),
            Self::U32(q) => q.add(rows, width, sums),
            Self::U64(q) => q.add(rows, width, sums),
        }
    }

    fn sum_row(&self, row: &[f32]) -> f32 {
        match self {
            Self::U8(q) => q.sum_row(row),
            Self::U16(q) => q.sum_row(row),
            Self::U32(q) => q.sum_row(row),
            Self::U64(q) => q.sum_row(row),
        }
    }
}

/// A tree ensemble read from an ONNX graph, evaluated natively.
#[derive(Debug, Clone, PartialEq)]
pub struct Forest {
    branches: Vec<Branch>,
    leaves: Vec<f32>,
    /// One reference per tree, in the graph's tree order.
    roots: Vec<u32>,
    /// The same trees for walks in lockstep, when every branch is `BRANCH_LEQ`.
    lockstep: Option<Lockstep>,
    /// The same trees ruled on by feature, when every branch is `BRANCH_LEQ` and no tree
    /// has more than 64 leaves; taken before `lockstep`.
    quick: Option<QuickAny>,
    base: f32,
    post: Post,
    width: usize,
}

/// Why a graph is not taken natively (it is then scored by ONNX Runtime).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unsupported(pub String);

fn unsupported<T>(why: impl Into<String>) -> Result<T, Unsupported> {
    Err(Unsupported(why.into()))
}

/// Every tree ends in leaves: a walk longer than the node count would loop.
fn check_acyclic(nodes: &[Node], roots: &[u32]) -> Result<(), Unsupported> {
    let limit = nodes.len();
    let mut stack: Vec<(u32, usize)> = roots.iter().map(|&r| (r, 0)).collect();
    while let Some((i, depth)) = stack.pop() {
        if depth > limit {
            return unsupported("a tree has a cycle");
        }
        let n = &nodes[i as usize];
        if n.mode != LEAF {
            stack.push((n.next_true, depth + 1));
            stack.push((n.next_false, depth + 1));
        }
    }
    Ok(())
}

/// Lays the nodes out for evaluation: branches and leaves apart, children by reference.
fn compile(nodes: &[Node], roots: &[u32], base: f32, post: Post, width: usize) -> Forest {
    let mut branch_of = vec![0u32; nodes.len()];
    let mut leaf_of = vec![0u32; nodes.len()];
    let (mut branches, mut leaves) = (Vec::new(), Vec::new());
    for (i, n) in nodes.iter().enumerate() {
        if n.mode == LEAF {
            leaf_of[i] = leaves.len() as u32;
            leaves.push(n.weight);
        } else {
            branch_of[i] = branches.len() as u32;
            branches.push(Branch {
                threshold: n.threshold,
                feature: n.feature,
                mode: n.mode,
                missing_true: n.missing_true,
                next: [0, 0],
            });
        }
    }
    let reference = |i: u32| {
        let i = i as usize;
        if nodes[i].mode == LEAF {
            LEAF_BIT | leaf_of[i]
        } else {
            branch_of[i]
        }
    };
    for (i, n) in nodes.iter().enumerate() {
        if n.mode != LEAF {
            branches[branch_of[i] as usize].next =
                [reference(n.next_true), reference(n.next_false)];
        }
    }
    let leq_only = branches.iter().all(|b| b.mode == LEQ);
    Forest {
        lockstep: leq_only.then(|| Lockstep::build(nodes, roots)),
        quick: leq_only
            .then(|| QuickAny::build(nodes, roots, width))
            .flatten(),
        branches,
        leaves,
        roots: roots.iter().map(|&r| reference(r)).collect(),
        base,
        post,
        width,
    }
}

impl Forest {
    /// Reads the tree ensemble of `onnx` (a serialized `ModelProto`) whose features are
    /// `width` wide and whose probabilities output is `output`.
    pub fn from_onnx(onnx: &[u8], output: &str, width: usize) -> Result<Self, Unsupported> {
        let parsed = Parsed::from_onnx(onnx, output, width)?;
        Ok(compile(
            &parsed.nodes,
            &parsed.roots,
            parsed.base,
            parsed.post,
            width,
        ))
    }

    /// Number of trees.
    pub fn trees(&self) -> usize {
        self.roots.len()
    }
}

/// The tree ensemble of an ONNX graph, read and checked, before compiling.
struct Parsed {
    nodes: Vec<Node>,
    roots: Vec<u32>,
    base: f32,
    post: Post,
    /// Each node's (tree id, node id) in the graph.
    ids: Vec<(i64, i64)>,
}

impl Parsed {
    fn from_onnx(onnx: &[u8], output: &str, width: usize) -> Result<Self, Unsupported> {
        let model = proto::ModelProto::decode(onnx)
            .map_err(|e| Unsupported(format!("not an ONNX model: {e}")))?;
        let Some(graph) = model.graph else {
            return unsupported("the model has no graph");
        };
        let mut ensemble = None;
        let mut aliases: HashMap<&str, &str> = HashMap::new();
        for node in &graph.node {
            match (node.domain.as_str(), node.op_type.as_str()) {
                ("ai.onnx.ml", "TreeEnsembleClassifier") if ensemble.is_none() => {
                    ensemble = Some(node);
                }
                ("" | "ai.onnx", "Identity") if node.input.len() == 1 && node.output.len() == 1 => {
                    aliases.insert(node.output[0].as_str(), node.input[0].as_str());
                }
                (d, op) => return unsupported(format!("node {d}.{op} is not covered")),
            }
        }
        let Some(node) = ensemble else {
            return unsupported("no TreeEnsembleClassifier node");
        };
        let mut source = output;
        while let Some(s) = aliases.get(source) {
            source = s;
        }
        if node.output.get(1).map(String::as_str) != Some(source) {
            return unsupported(format!(
                "output {output} is not the ensemble's probabilities"
            ));
        }
        Self::from_node(node, width)
    }

    fn from_node(node: &proto::NodeProto, width: usize) -> Result<Self, Unsupported> {
        let attr = |name: &str| node.attribute.iter().find(|a| a.name == name);
        let ints = |name: &str| attr(name).map(|a| a.ints.clone()).unwrap_or_default();
        let floats = |name: &str| attr(name).map(|a| a.floats.clone()).unwrap_or_default();
        let labels = ints("classlabels_int64s");
        if labels.len() != 2 || attr("classlabels_strings").is_some() {
            return unsupported("not a binary classifier with integer labels");
        }
        let post = match attr("post_transform").map(|a| a.s.as_slice()) {
            None | Some(b"NONE") => Post::None,
            Some(b"LOGISTIC") => Post::Logistic,
            Some(other) => {
                return unsupported(format!(
                    "post_transform {} is not covered",
                    String::from_utf8_lossy(other)
                ));
            }
        };
        let base = match floats("base_values").as_slice() {
            [] => 0.0,
            [b] => *b,
            _ => return unsupported("more than one base value"),
        };
        let tree_ids = ints("nodes_treeids");
        let node_ids = ints("nodes_nodeids");
        let features = ints("nodes_featureids");
        let values = floats("nodes_values");
        let modes: Vec<Vec<u8>> = attr("nodes_modes")
            .map(|a| a.strings.clone())
            .unwrap_or_default();
        let trues = ints("nodes_truenodeids");
        let falses = ints("nodes_falsenodeids");
        let mut missing = ints("nodes_missing_value_tracks_true");
        let n = tree_ids.len();
        if missing.is_empty() {
            missing = vec![0; n];
        }
        if [
            node_ids.len(),
            features.len(),
            values.len(),
            modes.len(),
            trues.len(),
            falses.len(),
            missing.len(),
        ]
        .iter()
        .any(|&l| l != n)
            || n == 0
        {
            return unsupported("node attributes differ in length");
        }
        if attr("nodes_values_as_tensor").is_some() || attr("nodes_hitrates_as_tensor").is_some() {
            return unsupported("tensor-valued node attributes are not covered");
        }
        // Global index of (tree, node id); trees in order of first appearance.
        let mut index: HashMap<(i64, i64), u32> = HashMap::with_capacity(n);
        let mut roots: Vec<u32> = Vec::new();
        let mut root_of: HashMap<i64, ()> = HashMap::new();
        for i in 0..n {
            if index.insert((tree_ids[i], node_ids[i]), i as u32).is_some() {
                return unsupported("a node id repeats within its tree");
            }
            if root_of.insert(tree_ids[i], ()).is_none() {
                roots.push(i as u32);
            }
        }
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let mode = match modes[i].as_slice() {
                b"LEAF" => LEAF,
                b"BRANCH_LEQ" => LEQ,
                b"BRANCH_LT" => LT,
                b"BRANCH_GTE" => GTE,
                b"BRANCH_GT" => GT,
                b"BRANCH_EQ" => EQ,
                b"BRANCH_NEQ" => NEQ,
                other => {
                    return unsupported(format!(
                        "node mode {} is not covered",
                        String::from_utf8_lossy(other)
                    ));
                }
            };
            let (mut next_true, mut next_false, mut feature) = (0, 0, 0);
            if mode != LEAF {
                let f = features[i];
                if f < 0 || f as usize >= width || f > i64::from(u16::MAX) {
                    return unsupported(format!("feature {f} is outside {width} features"));
                }
                feature = f as u16;
                let find = |id: i64| index.get(&(tree_ids[i], id)).copied();
                match (find(trues[i]), find(falses[i])) {
                    (Some(t), Some(f)) => (next_true, next_false) = (t, f),
                    _ => return unsupported("a branch points at a node that does not exist"),
                }
            }
            nodes.push(Node {
                threshold: values[i],
                weight: 0.0,
                next_true,
                next_false,
                feature,
                mode,
                missing_true: missing[i] != 0,
            });
        }
        let class_trees = ints("class_treeids");
        let class_nodes = ints("class_nodeids");
        let class_ids = ints("class_ids");
        let weights = floats("class_weights");
        if [class_nodes.len(), class_ids.len(), weights.len()]
            .iter()
            .any(|&l| l != class_trees.len())
        {
            return unsupported("class attributes differ in length");
        }
        if class_ids.iter().any(|&c| c != 0) {
            return unsupported("leaves add to more than one class");
        }
        if weights.iter().all(|w| *w >= 0.0) {
            // ONNX Runtime scores such an ensemble as [1 - s, s]: not covered here.
            return unsupported("every leaf weight is positive");
        }
        for j in 0..class_trees.len() {
            let Some(&i) = index.get(&(class_trees[j], class_nodes[j])) else {
                return unsupported("a class weight names a node that does not exist");
            };
            let leaf = &mut nodes[i as usize];
            if leaf.mode != LEAF {
                return unsupported("a class weight names a branch");
            }
            leaf.weight += weights[j];
        }
        check_acyclic(&nodes, &roots)?;
        Ok(Parsed {
            nodes,
            roots,
            base,
            post,
            ids: tree_ids.into_iter().zip(node_ids).collect(),
        })
    }
}

/// A TreeSHAP explainer of the tree ensemble in an ONNX graph, in raw score (log-odds) units:
/// the same graph reading as [`Forest::from_onnx`], with `covers[tree id][node id]` (the
/// training rows of each node, from the model's metadata) as the trees' covers. Only
/// `BRANCH_LEQ` splits and a `LOGISTIC` or no post-transform are covered.
pub fn explainer(
    onnx: &[u8],
    output: &str,
    width: usize,
    covers: &[Vec<f64>],
) -> Result<crate::explain::Explainer, Unsupported> {
    use crate::explain;
    let parsed = Parsed::from_onnx(onnx, output, width)?;
    let cover = |i: usize| -> Result<f64, Unsupported> {
        let (t, n) = parsed.ids[i];
        usize::try_from(t)
            .ok()
            .and_then(|t| covers.get(t))
            .and_then(|c| usize::try_from(n).ok().and_then(|n| c.get(n)))
            .copied()
            .filter(|c| c.is_finite() && *c > 0.0)
            .ok_or_else(|| Unsupported(format!("no cover for node {n} of tree {t}")))
    };
    // One explain tree per graph tree: its nodes in graph order, children by local index.
    let mut tree_of: HashMap<i64, usize> = HashMap::new();
    let mut trees: Vec<explain::Tree> = Vec::new();
    let mut local = vec![0usize; parsed.nodes.len()];
    for (i, (t, _)) in parsed.ids.iter().enumerate() {
        let k = *tree_of.entry(*t).or_insert_with(|| {
            trees.push(explain::Tree {
                nodes: Vec::new(),
                root: 0,
            });
            trees.len() - 1
        });
        local[i] = trees[k].nodes.len();
        trees[k].nodes.push(explain::Node::Leaf {
            value: 0.0,
            cover: 0.0,
        });
    }
    for (i, node) in parsed.nodes.iter().enumerate() {
        let k = tree_of[&parsed.ids[i].0];
        let cover = cover(i)?;
        trees[k].nodes[local[i]] = match node.mode {
            LEAF => explain::Node::Leaf {
                value: f64::from(node.weight),
                cover,
            },
            LEQ => explain::Node::Split {
                feature: usize::from(node.feature),
                threshold: node.threshold,
                yes: local[node.next_true as usize],
                no: local[node.next_false as usize],
                missing_yes: node.missing_true,
                cover,
            },
            _ => return unsupported("only BRANCH_LEQ splits are explained"),
        };
    }
    for &r in &parsed.roots {
        let k = tree_of[&parsed.ids[r as usize].0];
        trees[k].root = local[r as usize];
    }
    explain::Explainer::new(trees, f64::from(parsed.base), width)
        .map_err(|e| Unsupported(e.to_string()))
}

impl Forest {
    /// Features per row.
    pub fn width(&self) -> usize {
        self.width
    }

    /// The summed leaf weights of one row, any branch mode.
    fn sum_any(&self, row: &[f32]) -> f32 {
        let mut sum = 0.0f32;
        for &root in &self.roots {
            let mut c = root;
            while c & LEAF_BIT == 0 {
                let b = &self.branches[c as usize];
                let x = row[b.feature as usize];
                let t = b.threshold;
                let cmp = match b.mode {
                    LEQ => x <= t,
                    LT => x < t,
                    GTE => x >= t,
                    GT => x > t,
                    EQ => x == t,
                    _ => x != t,
                };
                let to_true = cmp | (b.missing_true & x.is_nan());
                c = b.next[usize::from(!to_true)];
            }
            sum += self.leaves[(c & !LEAF_BIT) as usize];
        }
        sum
    }

    /// The positive class's probability of one row (`width` features).
    pub fn score_row(&self, row: &[f32]) -> f32 {
        let sum = match (&self.quick, &self.lockstep) {
            (Some(q), _) => q.sum_row(row),
            (None, Some(l)) => l.sum_row(row),
            (None, None) => self.sum_any(row),
        };
        self.finish(sum)
    }

    fn finish(&self, sum: f32) -> f32 {
        let s = sum + self.base;
        match self.post {
            Post::None => s,
            Post::Logistic => logistic(s),
        }
    }

    /// `n` rows that visit both sides of the ensemble's splits: each feature takes one of its
    /// thresholds, the float just above or below it, or a missing value, chosen by a fixed
    /// pseudo-random sequence (the same rows every time).
    pub fn probe_rows(&self, n: usize) -> Vec<f32> {
        let mut thresholds: Vec<Vec<f32>> = vec![Vec::new(); self.width];
        for b in &self.branches {
            thresholds[b.feature as usize].push(b.threshold);
        }
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut rows = Vec::with_capacity(n * self.width);
        for _ in 0..n {
            for t in &thresholds {
                let r = next();
                let value = if t.is_empty() || r % 8 == 0 {
                    f32::NAN
                } else {
                    let v = t[(r >> 8) as usize % t.len()];
                    match r % 8 {
                        1..=3 => v,
                        4 | 5 => v.next_up(),
                        _ => v.next_down(),
                    }
                };
                rows.push(value);
            }
        }
        rows
    }

    /// Scores `rows` (row-major, `width` per row).
    pub fn score(&self, rows: &[f32]) -> Vec<f32> {
        let n = rows.len() / self.width;
        let rows = &rows[..n * self.width];
        match (&self.quick, &self.lockstep) {
            (Some(q), _) if n > 1 => {
                let mut sums = vec![0.0f32; n];
                q.add(rows, self.width, &mut sums);
                sums.into_iter().map(|s| self.finish(s)).collect()
            }
            (None, Some(l)) if n > 1 => {
                let mut sums = vec![0.0f32; n];
                l.add(rows, self.width, &mut sums);
                sums.into_iter().map(|s| self.finish(s)).collect()
            }
            _ => rows
                .chunks_exact(self.width)
                .map(|r| self.score_row(r))
                .collect(),
        }
    }
}

/// ONNX Runtime's logistic: symmetric, so large negative inputs keep their precision.
fn logistic(x: f32) -> f32 {
    let v = 1.0 / (1.0 + (-x.abs()).exp());
    if x < 0.0 { 1.0 - v } else { v }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{AttributeProto, GraphProto, ModelProto, NodeProto, ValueInfoProto};

    fn ints(name: &str, v: &[i64]) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            ints: v.to_vec(),
            ..Default::default()
        }
    }

    fn floats(name: &str, v: &[f32]) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            floats: v.to_vec(),
            ..Default::default()
        }
    }

    fn strings(name: &str, v: &[&str]) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            strings: v.iter().map(|s| s.as_bytes().to_vec()).collect(),
            ..Default::default()
        }
    }

    /// Two trees over 2 features: tree 0 splits x0 <= 1 (missing goes true), tree 1 splits
    /// x1 < 5 (missing goes false).
    fn ensemble(post: &str) -> Vec<u8> {
        ensemble_with(post, "BRANCH_LT")
    }

    /// As [`ensemble`], with `second` as the mode of tree 1's split.
    fn ensemble_with(post: &str, second: &str) -> Vec<u8> {
        let node = NodeProto {
            input: vec!["features".into()],
            output: vec!["label_t".into(), "prob_t".into()],
            op_type: "TreeEnsembleClassifier".into(),
            domain: "ai.onnx.ml".into(),
            attribute: vec![
                ints("classlabels_int64s", &[0, 1]),
                ints("nodes_treeids", &[0, 0, 0, 1, 1, 1]),
                ints("nodes_nodeids", &[0, 1, 2, 0, 1, 2]),
                ints("nodes_featureids", &[0, 0, 0, 1, 0, 0]),
                floats("nodes_values", &[1.0, 0.0, 0.0, 5.0, 0.0, 0.0]),
                strings(
                    "nodes_modes",
                    &["BRANCH_LEQ", "LEAF", "LEAF", second, "LEAF", "LEAF"],
                ),
                ints("nodes_truenodeids", &[1, 0, 0, 1, 0, 0]),
                ints("nodes_falsenodeids", &[2, 0, 0, 2, 0, 0]),
                ints("nodes_missing_value_tracks_true", &[1, 0, 0, 0, 0, 0]),
                ints("class_treeids", &[0, 0, 1, 1]),
                ints("class_nodeids", &[1, 2, 1, 2]),
                ints("class_ids", &[0, 0, 0, 0]),
                floats("class_weights", &[-1.0, 2.0, 0.5, -0.25]),
                AttributeProto {
                    name: "post_transform".into(),
                    s: post.as_bytes().to_vec(),
                    ..Default::default()
                },
            ],
        };
        let identity = NodeProto {
            input: vec!["prob_t".into()],
            output: vec!["probabilities".into()],
            op_type: "Identity".into(),
            ..Default::default()
        };
        ModelProto {
            graph: Some(GraphProto {
                node: vec![node, identity],
                input: vec![ValueInfoProto {
                    name: "features".into(),
                }],
                output: vec![ValueInfoProto {
                    name: "probabilities".into(),
                }],
            }),
        }
        .encode_to_vec()
    }

    #[test]
    fn walks_each_tree_with_its_mode_and_missing_rule() {
        let f = Forest::from_onnx(&ensemble("NONE"), "probabilities", 2).unwrap_or_else(|e| {
            panic!("{e}");
        });
        assert_eq!(f.trees(), 2);
        // x0 <= 1 -> -1.0; x1 < 5 -> 0.5
        assert_eq!(f.score_row(&[1.0, 4.9]), -0.5);
        // x0 > 1 -> 2.0; x1 >= 5 -> -0.25
        assert_eq!(f.score_row(&[1.5, 5.0]), 1.75);
        // missing x0 tracks true (-1.0); missing x1 goes false (-0.25)
        assert_eq!(f.score_row(&[f32::NAN, f32::NAN]), -1.25);
    }

    /// Random trees: `leaves` leaves each, split on `width` features with thresholds drawn
    /// from a few values (so rows tie with them), a random missing rule per branch.
    fn random_forest(trees: usize, leaves: usize, width: usize, seed: u64) -> Forest {
        let mut state = seed | 1;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut nodes: Vec<Node> = Vec::new();
        let mut roots = Vec::new();
        for _ in 0..trees {
            let root = nodes.len() as u32;
            roots.push(root);
            nodes.push(Node {
                threshold: 0.0,
                weight: (next() % 1000) as f32 / 100.0 - 5.0,
                next_true: 0,
                next_false: 0,
                feature: 0,
                mode: LEAF,
                missing_true: false,
            });
            let mut tree_leaves = vec![root];
            while tree_leaves.len() < leaves {
                // Split a random leaf into a branch and two new leaves.
                let at = (next() % tree_leaves.len() as u64) as usize;
                let i = tree_leaves.swap_remove(at);
                let (t, f) = (nodes.len() as u32, nodes.len() as u32 + 1);
                for _ in 0..2 {
                    let mut leaf = nodes[i as usize];
                    leaf.weight = (next() % 1000) as f32 / 100.0 - 5.0;
                    nodes.push(leaf);
                }
                let r = next();
                nodes[i as usize] = Node {
                    threshold: (r % 7) as f32 - 3.0,
                    weight: 0.0,
                    next_true: t,
                    next_false: f,
                    feature: ((r >> 8) % width as u64) as u16,
                    mode: LEQ,
                    missing_true: (r >> 16) % 2 == 0,
                };
                tree_leaves.extend([t, f]);
            }
        }
        compile(&nodes, &roots, 0.25, Post::None, width)
    }

    #[test]
    fn rules_by_feature_equal_the_general_walk_for_every_leaf_width() {
        for (leaves, bits) in [(1, 8), (8, 8), (9, 16), (31, 32), (64, 64), (65, 0)] {
            let f = random_forest(40, leaves, 5, leaves as u64 * 7919);
            let quick = match (&f.quick, bits) {
                (None, 0) => continue,
                (Some(QuickAny::U8(_)), 8)
                | (Some(QuickAny::U16(_)), 16)
                | (Some(QuickAny::U32(_)), 32)
                | (Some(QuickAny::U64(_)), 64) => f.quick.as_ref().unwrap_or_else(|| panic!()),
                (q, _) => panic!("{leaves} leaves: {q:?}"),
            };
            // 203 rows: full blocks and a partial one; values on, above and below the
            // thresholds, and missing.
            let rows = f.probe_rows(203);
            let mut sums = vec![0.0f32; 203];
            quick.add(&rows, 5, &mut sums);
            for (i, row) in rows.chunks_exact(5).enumerate() {
                let want = f.sum_any(row);
                assert_eq!(
                    quick.sum_row(row).to_bits(),
                    want.to_bits(),
                    "{leaves}: {row:?}"
                );
                assert_eq!(
                    sums[i].to_bits(),
                    want.to_bits(),
                    "{leaves}, row {i}: {row:?}"
                );
            }
        }
        // A NaN threshold is left to the walk.
        let mut f = random_forest(1, 2, 1, 3);
        let nodes: Vec<Node> = vec![
            Node {
                threshold: f32::NAN,
                weight: 0.0,
                next_true: 1,
                next_false: 2,
                feature: 0,
                mode: LEQ,
                missing_true: true,
            },
            Node {
                threshold: 0.0,
                weight: 1.0,
                next_true: 0,
                next_false: 0,
                feature: 0,
                mode: LEAF,
                missing_true: false,
            },
            Node {
                threshold: 0.0,
                weight: 2.0,
                next_true: 0,
                next_false: 0,
                feature: 0,
                mode: LEAF,
                missing_true: false,
            },
        ];
        f = compile(&nodes, &[0], f.base, f.post, 1);
        assert!(f.quick.is_none());
        assert_eq!(f.score(&[1.0, f32::NAN]), vec![2.25, 1.25]);
    }

    #[test]
    fn walks_in_lockstep_equal_the_general_walk() {
        let bytes = ensemble_with("NONE", "BRANCH_LEQ");
        let f = Forest::from_onnx(&bytes, "probabilities", 2).unwrap_or_else(|e| panic!("{e}"));
        let Some(lock) = &f.lockstep else {
            panic!("an all-LEQ ensemble walks in lockstep");
        };
        assert_eq!(lock.depth, vec![1, 1]);
        // 203 rows: full lanes and a partial one.
        let rows = f.probe_rows(203);
        let batch = f.score(&rows);
        for (i, row) in rows.chunks_exact(2).enumerate() {
            let want = f.sum_any(row);
            assert_eq!(lock.sum_row(row).to_bits(), want.to_bits(), "{row:?}");
            assert_eq!(batch[i].to_bits(), want.to_bits(), "row {i}: {row:?}");
        }
    }

    #[test]
    fn logistic_post_transform_gives_a_probability() {
        let f = Forest::from_onnx(&ensemble("LOGISTIC"), "probabilities", 2)
            .unwrap_or_else(|e| panic!("{e}"));
        let p = f.score_row(&[1.5, 5.0]);
        assert!((p - 1.0 / (1.0 + (-1.75f32).exp())).abs() < 1e-7, "{p}");
        // As ONNX Runtime computes it: symmetric around 0.5.
        assert_eq!(logistic(0.0), 0.5);
        for x in [0.1f32, 1.0, 3.7, 12.0] {
            assert!((logistic(x) + logistic(-x) - 1.0).abs() < 1e-7, "{x}");
        }
    }

    #[test]
    fn graphs_it_does_not_cover_are_refused_with_the_reason() {
        let e = Forest::from_onnx(&ensemble("SOFTMAX"), "probabilities", 2).unwrap_err();
        assert!(e.0.contains("SOFTMAX"), "{e}");
        let e = Forest::from_onnx(&ensemble("NONE"), "label", 2).unwrap_err();
        assert!(e.0.contains("not the ensemble's probabilities"), "{e}");
        let e = Forest::from_onnx(&ensemble("NONE"), "probabilities", 1).unwrap_err();
        assert!(e.0.contains("outside 1 features"), "{e}");
        let e = Forest::from_onnx(b"not protobuf \xff\xff", "probabilities", 2).unwrap_err();
        assert!(!e.0.is_empty());
    }
}
