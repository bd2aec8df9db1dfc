//! A direct decoder of the Debezium envelope's Avro binary, for the scorer's hot path.
//!
//! The writer schema is compiled once per schema id into a [`Plan`]; a record is then read
//! straight from its bytes: the fields the scorer needs (`op`, `before`, `after`,
//! `source.ts_ms`, `ts_ms`) are read as borrowed slices and numbers, everything else is
//! skipped without building a value. The result is the [`CdcEvent`] that [`crate::from_avro`]
//! makes from the generic decoder's value: same field rules (through the same row
//! conversion), same BACKWARD evolution behaviour (a field is found by name, whatever its
//! position). On anything but a clean success (bytes that do not follow the schema, bytes
//! left over, an envelope the scorer refuses) the caller decodes generically instead, so
//! errors and dead letters stay exactly those of the generic path.

use std::collections::HashMap;

use apache_avro::Schema;
use apache_avro::schema::{InnerDecimalSchema, UuidSchema};

use crate::{CdcEvent, Field, Row, lead_from, op_from};

/// How one value of the writer schema is laid out, as far as reading or skipping it goes.
#[derive(Debug, Clone, PartialEq)]
enum Node {
    Null,
    Boolean,
    /// `int` and `date` (read as an integer).
    Int,
    /// `long`, `timestamp-millis`, `local-timestamp-millis`.
    Long,
    /// `timestamp-micros`, `local-timestamp-micros`: read as milliseconds.
    Micros,
    Float,
    Double,
    String,
    Enum(Vec<String>),
    /// A value the row conversion takes as "other" (bytes, fixed, uuid, decimal, times of
    /// day, nanos, duration): skipped, reported with the generic path's type name.
    Opaque(Opaque, &'static str),
    Array(Box<Node>),
    Map(Box<Node>),
    Union(Vec<Node>),
    /// Index into the plan's records.
    Record(usize),
}

/// How an opaque value is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opaque {
    /// Length-prefixed (`bytes`, `string`-backed).
    Sized,
    /// Fixed size.
    Fixed(usize),
    /// One zig-zag varint.
    Varint,
}

/// A record's fields in writer order.
#[derive(Debug, Clone, PartialEq)]
struct Record {
    fields: Vec<(String, Node)>,
}

/// A compiled writer schema of the Debezium envelope.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    records: Vec<Record>,
    root: usize,
}

/// Why a writer schema is not compiled (the generic decoder is used for it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NotCompiled(pub String);

struct Compiler<'s> {
    names: HashMap<String, &'s Schema>,
    records: Vec<Record>,
    by_name: HashMap<String, usize>,
}

impl<'s> Compiler<'s> {
    fn collect(&mut self, s: &'s Schema) {
        match s {
            Schema::Record(r) => {
                self.names.insert(r.name.fullname(None), s);
                for f in &r.fields {
                    self.collect(&f.schema);
                }
            }
            Schema::Enum(e) => {
                self.names.insert(e.name.fullname(None), s);
            }
            Schema::Fixed(f) | Schema::Duration(f) => {
                self.names.insert(f.name.fullname(None), s);
            }
            Schema::Array(a) => self.collect(&a.items),
            Schema::Map(m) => self.collect(&m.types),
            Schema::Union(u) => u.variants().iter().for_each(|v| self.collect(v)),
            _ => {}
        }
    }

    fn node(&mut self, s: &'s Schema, depth: usize) -> Result<Node, NotCompiled> {
        if depth > 64 {
            return Err(NotCompiled("schema nests deeper than 64".into()));
        }
        Ok(match s {
            Schema::Null => Node::Null,
            Schema::Boolean => Node::Boolean,
            Schema::Int | Schema::Date => Node::Int,
            Schema::Long | Schema::TimestampMillis | Schema::LocalTimestampMillis => Node::Long,
            Schema::TimestampMicros | Schema::LocalTimestampMicros => Node::Micros,
            Schema::Float => Node::Float,
            Schema::Double => Node::Double,
            Schema::String => Node::String,
            Schema::Bytes => Node::Opaque(Opaque::Sized, "bytes"),
            Schema::Fixed(f) => Node::Opaque(Opaque::Fixed(f.size), "bytes"),
            Schema::Enum(e) => Node::Enum(e.symbols.clone()),
            Schema::Uuid(UuidSchema::String) | Schema::Uuid(UuidSchema::Bytes) => {
                Node::Opaque(Opaque::Sized, "an unsupported Avro type")
            }
            Schema::Uuid(UuidSchema::Fixed(f)) => {
                Node::Opaque(Opaque::Fixed(f.size), "an unsupported Avro type")
            }
            Schema::Decimal(d) => match &d.inner {
                InnerDecimalSchema::Bytes => {
                    Node::Opaque(Opaque::Sized, "an unsupported Avro type")
                }
                InnerDecimalSchema::Fixed(f) => {
                    Node::Opaque(Opaque::Fixed(f.size), "an unsupported Avro type")
                }
            },
            Schema::BigDecimal => Node::Opaque(Opaque::Sized, "an unsupported Avro type"),
            Schema::TimeMillis
            | Schema::TimeMicros
            | Schema::TimestampNanos
            | Schema::LocalTimestampNanos => {
                Node::Opaque(Opaque::Varint, "an unsupported Avro type")
            }
            Schema::Duration(f) => Node::Opaque(Opaque::Fixed(f.size), "an unsupported Avro type"),
            Schema::Array(a) => Node::Array(Box::new(self.node(&a.items, depth + 1)?)),
            Schema::Map(m) => Node::Map(Box::new(self.node(&m.types, depth + 1)?)),
            Schema::Union(u) => Node::Union(
                u.variants()
                    .iter()
                    .map(|v| self.node(v, depth + 1))
                    .collect::<Result<_, _>>()?,
            ),
            Schema::Record(r) => {
                let name = r.name.fullname(None);
                if let Some(&i) = self.by_name.get(&name) {
                    return Ok(Node::Record(i));
                }
                let i = self.records.len();
                self.records.push(Record { fields: Vec::new() });
                self.by_name.insert(name, i);
                let fields = r
                    .fields
                    .iter()
                    .map(|f| Ok((f.name.clone(), self.node(&f.schema, depth + 1)?)))
                    .collect::<Result<Vec<_>, NotCompiled>>()?;
                self.records[i].fields = fields;
                Node::Record(i)
            }
            Schema::Ref { name } => {
                let full = name.fullname(None);
                match self.names.get(&full) {
                    Some(s) => self.node(s, depth + 1)?,
                    None => return Err(NotCompiled(format!("reference to unknown type {full}"))),
                }
            }
        })
    }
}

impl Plan {
    /// Compiles `writer` (the schema a record was written with).
    pub fn compile(writer: &Schema) -> Result<Self, NotCompiled> {
        let mut c = Compiler {
            names: HashMap::new(),
            records: Vec::new(),
            by_name: HashMap::new(),
        };
        c.collect(writer);
        match c.node(writer, 0)? {
            Node::Record(root) => Ok(Self {
                records: c.records,
                root,
            }),
            _ => Err(NotCompiled("the writer schema is not a record".into())),
        }
    }

    /// The event of one Avro datum (without the Confluent header), or `None` when the
    /// generic path must decide (the bytes do not follow the schema, bytes are left over,
    /// or the envelope is refused).
    pub fn decode(&self, datum: &[u8]) -> Option<CdcEvent> {
        let mut r = Reader { buf: datum };
        let mut env = Envelope::default();
        for (name, node) in &self.records[self.root].fields {
            match name.as_str() {
                "op" => env.op = Some(self.scalar(node, &mut r)?),
                "before" => env.before = Some(self.row(node, &mut r)?),
                "after" => env.after = Some(self.row(node, &mut r)?),
                "source" => env.source_ts = Some(self.source_ts(node, &mut r)?),
                "ts_ms" => env.ts_ms = Some(self.scalar(node, &mut r)?),
                _ => self.skip(node, &mut r)?,
            }
        }
        if !r.buf.is_empty() {
            return None;
        }
        env.event()
    }

    /// A value read as the row conversion sees it (unions unwrapped).
    fn scalar<'a>(&'a self, node: &'a Node, r: &mut Reader<'a>) -> Option<Field<'a>> {
        Some(match node {
            Node::Null => Field::Null,
            Node::Boolean => {
                r.take(1)?;
                Field::Other("a boolean")
            }
            Node::Int | Node::Long => Field::Int(r.long()?),
            Node::Micros => Field::Int(r.long()? / 1000),
            Node::Float => Field::Float(f64::from(f32::from_le_bytes(r.array()?))),
            Node::Double => Field::Float(f64::from_le_bytes(r.array()?)),
            Node::String => Field::Str(r.str()?),
            Node::Enum(symbols) => {
                let i = usize::try_from(r.long()?).ok()?;
                Field::Str(symbols.get(i)?.as_str())
            }
            Node::Opaque(_, what) => {
                self.skip(node, r)?;
                Field::Other(what)
            }
            Node::Array(_) => {
                self.skip(node, r)?;
                Field::Other("an array")
            }
            Node::Map(_) => {
                self.skip(node, r)?;
                Field::Other("a map")
            }
            Node::Record(_) => {
                self.skip(node, r)?;
                Field::Other("a record")
            }
            Node::Union(branches) => {
                let i = usize::try_from(r.long()?).ok()?;
                return self.scalar(branches.get(i)?, r);
            }
        })
    }

    /// `before`/`after`: null, or a record read into named fields; `Err` keeps the generic
    /// path's "not a record" refusal.
    fn row<'a>(
        &'a self,
        node: &'a Node,
        r: &mut Reader<'a>,
    ) -> Option<Result<Option<Fields<'a>>, ()>> {
        match node {
            Node::Null => Some(Ok(None)),
            Node::Union(branches) => {
                let i = usize::try_from(r.long()?).ok()?;
                self.row(branches.get(i)?, r)
            }
            Node::Record(i) => {
                let mut fields = Vec::with_capacity(self.records[*i].fields.len());
                for (name, n) in &self.records[*i].fields {
                    fields.push((name.as_str(), self.scalar(n, r)?));
                }
                Some(Ok(Some(Fields(fields))))
            }
            other => {
                self.skip(other, r)?;
                Some(Err(()))
            }
        }
    }

    /// `source`: its `ts_ms` when it is a record holding an integer there.
    fn source_ts<'a>(&'a self, node: &'a Node, r: &mut Reader<'a>) -> Option<Option<i64>> {
        match node {
            Node::Record(i) => {
                let mut ts = None;
                let mut seen = false;
                for (name, n) in &self.records[*i].fields {
                    if name == "ts_ms" && !seen {
                        seen = true;
                        if let Field::Int(ms) = self.scalar(n, r)? {
                            ts = Some(ms);
                        }
                    } else {
                        self.skip(n, r)?;
                    }
                }
                Some(ts)
            }
            // A union holding the record is not a record to the generic path either.
            other => {
                self.skip(other, r)?;
                Some(None)
            }
        }
    }

    fn skip(&self, node: &Node, r: &mut Reader<'_>) -> Option<()> {
        match node {
            Node::Null => {}
            Node::Boolean => {
                r.take(1)?;
            }
            Node::Int | Node::Long | Node::Micros | Node::Enum(_) => {
                r.long()?;
            }
            Node::Float => {
                r.take(4)?;
            }
            Node::Double => {
                r.take(8)?;
            }
            Node::String | Node::Opaque(Opaque::Sized, _) => {
                let n = usize::try_from(r.long()?).ok()?;
                r.take(n)?;
            }
            Node::Opaque(Opaque::Fixed(n), _) => {
                r.take(*n)?;
            }
            Node::Opaque(Opaque::Varint, _) => {
                r.long()?;
            }
            Node::Array(item) => self.skip_blocks(r, |r| self.skip(item, r))?,
            Node::Map(value) => self.skip_blocks(r, |r| {
                let n = usize::try_from(r.long()?).ok()?;
                r.take(n)?;
                self.skip(value, r)
            })?,
            Node::Union(branches) => {
                let i = usize::try_from(r.long()?).ok()?;
                self.skip(branches.get(i)?, r)?;
            }
            Node::Record(i) => {
                for (_, n) in &self.records[*i].fields {
                    self.skip(n, r)?;
                }
            }
        }
        Some(())
    }

    fn skip_blocks<'a>(
        &self,
        r: &mut Reader<'a>,
        mut item: impl FnMut(&mut Reader<'a>) -> Option<()>,
    ) -> Option<()> {
        loop {
            let count = r.long()?;
            if count == 0 {
                return Some(());
            }
            if count < 0 {
                // A negative count is followed by the block's size in bytes.
                r.long()?;
            }
            for _ in 0..count.unsigned_abs() {
                item(r)?;
            }
        }
    }
}

/// A row's fields by name, in writer order.
struct Fields<'a>(Vec<(&'a str, Field<'a>)>);

impl Row for Fields<'_> {
    fn field(&self, name: &str) -> Option<Field<'_>> {
        self.0.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
    }
}

/// What the envelope's fields held; `None`: the field is absent from the writer schema.
#[derive(Default)]
struct Envelope<'a> {
    op: Option<Field<'a>>,
    before: Option<Result<Option<Fields<'a>>, ()>>,
    after: Option<Result<Option<Fields<'a>>, ()>>,
    source_ts: Option<Option<i64>>,
    ts_ms: Option<Field<'a>>,
}

impl Envelope<'_> {
    /// The event, as [`crate::from_avro`] makes it; `None` for anything it refuses.
    fn event(self) -> Option<CdcEvent> {
        let op = match self.op? {
            Field::Str(s) => op_from(s).ok()?,
            _ => return None,
        };
        let row = |r: Option<Result<Option<Fields<'_>>, ()>>| match r {
            None => Some(None),
            Some(Err(())) => None,
            Some(Ok(None)) => Some(None),
            Some(Ok(Some(f))) => lead_from(&f).ok().map(Some),
        };
        let before = row(self.before)?;
        let after = row(self.after)?;
        let source_ts_ms = self.source_ts.flatten().or(match self.ts_ms {
            Some(Field::Int(ms)) => Some(ms),
            _ => None,
        });
        Some(CdcEvent {
            op,
            before,
            after,
            source_ts_ms,
        })
    }
}

/// Avro binary primitives over a borrowed buffer; `None` when the bytes run out or are
/// malformed.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    /// A zig-zag varint of at most 10 bytes.
    fn long(&mut self) -> Option<i64> {
        let mut value: u64 = 0;
        for shift in (0..70).step_by(7) {
            let (&b, rest) = self.buf.split_first()?;
            self.buf = rest;
            value |= u64::from(b & 0x7f).checked_shl(shift)?;
            if b & 0x80 == 0 {
                return Some(((value >> 1) as i64) ^ -((value & 1) as i64));
            }
        }
        None
    }

    fn str(&mut self) -> Option<&'a str> {
        let n = usize::try_from(self.long()?).ok()?;
        std::str::from_utf8(self.take(n)?).ok()
    }
}
