//! Strong types for values that are easy to mix up on the hot path.

use std::fmt;

macro_rules! newtype {
    ($(#[$doc:meta])* $name:ident($inner:ty)) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

newtype!(
    /// A record offset within one partition.
    Offset(i64)
);
newtype!(
    /// A partition index within one topic.
    PartitionId(i32)
);
newtype!(
    /// The index of a shard (one pinned core) within this broker process.
    ShardId(u32)
);
newtype!(
    /// A broker id as advertised in Metadata; shard i is node i.
    NodeId(i32)
);
newtype!(
    /// An idempotent producer's id.
    ProducerId(i64)
);
newtype!(
    /// A producer or leader epoch.
    Epoch(i32)
);

impl Offset {
    /// The offset after this one; saturates at i64::MAX (offsets read from
    /// hostile or damaged bytes must not overflow).
    pub fn next(self) -> Offset {
        Offset(self.0.saturating_add(1))
    }
}

impl From<ShardId> for NodeId {
    fn from(shard: ShardId) -> NodeId {
        NodeId(shard.0 as i32)
    }
}
