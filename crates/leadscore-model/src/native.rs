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

/// A tree ensemble read from an ONNX graph, evaluated natively.
#[derive(Debug, Clone, PartialEq)]
pub struct Forest {
    branches: Vec<Branch>,
    leaves: Vec<f32>,
    /// One reference per tree, in the graph's tree order.
    roots: Vec<u32>,
    /// The same trees for walks in lockstep, when every branch is `BRANCH_LEQ`.
    lockstep: Option<Lockstep>,
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
        let sum = match &self.lockstep {
            Some(l) => l.sum_row(row),
            None => self.sum_any(row),
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
        match &self.lockstep {
            Some(l) if n > 1 => {
                let mut sums = vec![0.0f32; n];
                l.add(&rows[..n * self.width], self.width, &mut sums);
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
