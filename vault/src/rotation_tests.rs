//! Key lifecycle tests (both backends).
