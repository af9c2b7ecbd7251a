//! Guest kernel: config fragment and `bot-bottle kernel build`.
