//! The provider conformance suite (filled in below).
