//! The guard stack: every step that acquires something pushes its undo; teardown runs the undos
//! in reverse order, keeps going past failures and reports all of them.
//!
//! Normal teardown is the explicit, consuming [`GuardStack::unwind`]. `Drop` is the fallback
//! for panics and early returns: it runs the remaining undos on a private runtime in a helper
//! thread, so it works from inside or outside tokio. Undo actions must therefore be
//! self-contained (open their own Docker connection, their own DB handle).

use std::future::Future;
use std::pin::Pin;

use crate::logging::say;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
type UndoFuture = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;
type Undo = Box<dyn FnOnce() -> UndoFuture + Send>;

/// One undo that failed.
#[derive(Debug, thiserror::Error)]
#[error("teardown step `{step}` failed")]
pub struct GuardError {
    pub step: String,
    #[source]
    pub source: BoxError,
}

#[derive(Default)]
pub struct GuardStack {
    bottle_id: String,
    undos: Vec<(String, Undo)>,
}

impl GuardStack {
    pub fn new(bottle_id: impl Into<String>) -> Self {
        Self {
            bottle_id: bottle_id.into(),
            undos: Vec::new(),
        }
    }

    /// Register the undo for something just acquired.
    pub fn push<F, Fut, E>(&mut self, step: impl Into<String>, undo: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let undo: Undo =
            Box::new(move || Box::pin(async move { undo().await.map_err(Into::into) }));
        self.undos.push((step.into(), undo));
    }

    /// Register a synchronous undo.
    pub fn push_sync<F, E>(&mut self, step: impl Into<String>, undo: F)
    where
        F: FnOnce() -> Result<(), E> + Send + 'static,
        E: Into<BoxError>,
    {
        self.push(step, move || async move { undo() });
    }

    pub fn len(&self) -> usize {
        self.undos.len()
    }

    pub fn is_empty(&self) -> bool {
        self.undos.is_empty()
    }

    /// Names of the registered steps, oldest first.
    pub fn steps(&self) -> Vec<String> {
        self.undos.iter().map(|(s, _)| s.clone()).collect()
    }

    /// Run every undo, newest first. Returns every failure; never stops early.
    pub async fn unwind(mut self) -> Vec<GuardError> {
        let undos = std::mem::take(&mut self.undos);
        run_all(&self.bottle_id, undos).await
    }
}

async fn run_all(bottle_id: &str, undos: Vec<(String, Undo)>) -> Vec<GuardError> {
    let mut errors = Vec::new();
    for (step, undo) in undos.into_iter().rev() {
        tracing::debug!(bottle_id, step = %step, "teardown");
        if let Err(source) = undo().await {
            tracing::warn!(bottle_id, step = %step, error = %source, "teardown step failed");
            errors.push(GuardError { step, source });
        }
    }
    errors
}

impl Drop for GuardStack {
    fn drop(&mut self) {
        if self.undos.is_empty() {
            return;
        }
        let undos = std::mem::take(&mut self.undos);
        let bottle_id = self.bottle_id.clone();
        tracing::warn!(bottle_id = %bottle_id, steps = undos.len(), "guard stack dropped without unwind: tearing down");
        let handle =
            std::thread::spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => {
                        let errors = rt.block_on(run_all(&bottle_id, undos));
                        for e in &errors {
                            say(format_args!("{e}: {}", e.source));
                        }
                    }
                    Err(err) => say(format_args!(
                        "cannot run teardown ({err}); run `bot-bottle cleanup`"
                    )),
                }
            });
        if handle.join().is_err() {
            say(format_args!("teardown panicked; run `bot-bottle cleanup`"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn recorder() -> Arc<Mutex<Vec<String>>> {
        Arc::new(Mutex::new(Vec::new()))
    }

    fn push_recording(
        stack: &mut GuardStack,
        log: &Arc<Mutex<Vec<String>>>,
        name: &str,
        fail: bool,
    ) {
        let log = log.clone();
        let name = name.to_owned();
        stack.push_sync(name.clone(), move || {
            log.lock().unwrap().push(name.clone());
            if fail {
                Err(BoxError::from(format!("{name} broke")))
            } else {
                Ok(())
            }
        });
    }

    #[tokio::test]
    async fn unwind_runs_in_reverse_and_reports_every_failure() {
        let log = recorder();
        let mut stack = GuardStack::new("b");
        push_recording(&mut stack, &log, "network", false);
        push_recording(&mut stack, &log, "bundle", true);
        push_recording(&mut stack, &log, "agent", true);
        let errors = stack.unwind().await;
        assert_eq!(*log.lock().unwrap(), vec!["agent", "bundle", "network"]);
        let failed: Vec<&str> = errors.iter().map(|e| e.step.as_str()).collect();
        assert_eq!(failed, vec!["agent", "bundle"]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn drop_without_unwind_still_tears_down_inside_a_runtime() {
        let log = recorder();
        let mut stack = GuardStack::new("b");
        push_recording(&mut stack, &log, "one", false);
        push_recording(&mut stack, &log, "two", false);
        drop(stack);
        assert_eq!(*log.lock().unwrap(), vec!["two", "one"]);
    }

    #[test]
    fn panic_unwinding_through_the_stack_tears_down() {
        let log = recorder();
        let log2 = log.clone();
        let result = std::panic::catch_unwind(move || {
            let mut stack = GuardStack::new("b");
            push_recording(&mut stack, &log2, "lease", false);
            panic!("boom");
        });
        assert!(result.is_err());
        assert_eq!(*log.lock().unwrap(), vec!["lease"]);
    }
}
