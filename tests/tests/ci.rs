//! The dev CI runner (`ci run-dev-e2e`, `ci logs`) end to end: filled in by the CI runner work.
