//! Circuit breakers: one per scope key, with a pure state machine. (In progress.)
