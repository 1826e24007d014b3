//! Rate limiters: one per scope key, four strategies. (In progress.)
