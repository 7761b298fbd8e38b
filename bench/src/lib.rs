//! Benchmarks live here (see the replay benchmark issue).
