//! Root filesystem images made from the agent Docker image.
