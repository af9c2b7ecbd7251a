//! The guard stack: every step that acquires something pushes its undo; teardown runs the undos
//! in reverse order, keeps going past failures and reports all of them.
//!
//! Undos pushed with [`GuardStack::push_beside`] run at the same time as the one pushed just
//! before them (two containers, two networks): teardown waits for the whole group before the
//! group before it, so the order between groups holds.
//!
//! Normal teardown is the explicit, consuming [`GuardStack::unwind`]. `Drop` is the fallback
//! for panics and early returns: it runs the remaining undos on a private runtime in a helper
//! thread, so it works from inside or outside tokio. Undo actions must therefore be
//! self-contained (open their own Docker connection, their own DB handle).

use std::future::Future;
use std::pin::Pin;

use crate::host::logging::say;

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
    /// (step, undo, runs beside the one before it).
    undos: Vec<(String, Undo, bool)>,
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
        self.push_undo(step.into(), undo, false);
    }

    /// Register an undo that may run at the same time as the one registered just before it
    /// (neither needs the other gone first).
    pub fn push_beside<F, Fut, E>(&mut self, step: impl Into<String>, undo: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let beside = !self.undos.is_empty();
        self.push_undo(step.into(), undo, beside);
    }

    fn push_undo<F, Fut, E>(&mut self, step: String, undo: F, beside: bool)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let undo: Undo =
            Box::new(move || Box::pin(async move { undo().await.map_err(Into::into) }));
        self.undos.push((step, undo, beside));
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
        self.undos.iter().map(|(s, _, _)| s.clone()).collect()
    }

    /// Run every undo, newest first. Returns every failure; never stops early.
    pub async fn unwind(mut self) -> Vec<GuardError> {
        let undos = std::mem::take(&mut self.undos);
        run_all(&self.bottle_id, undos).await
    }
}

async fn run_all(bottle_id: &str, undos: Vec<(String, Undo, bool)>) -> Vec<GuardError> {
    // Groups in push order: an undo pushed beside joins the group of the one before it.
    let mut groups: Vec<Vec<(String, Undo)>> = Vec::new();
    for (step, undo, beside) in undos {
        match groups.last_mut() {
            Some(group) if beside => group.push((step, undo)),
            _ => groups.push(vec![(step, undo)]),
        }
    }
    let mut errors = Vec::new();
    for group in groups.into_iter().rev() {
        let runs = group.into_iter().rev().map(|(step, undo)| async move {
            tracing::debug!(bottle_id, step = %step, "teardown");
            let result = undo().await;
            if let Err(source) = &result {
                tracing::warn!(bottle_id, step = %step, error = %source, "teardown step failed");
            }
            result.err().map(|source| GuardError { step, source })
        });
        errors.extend(
            futures_util::future::join_all(runs)
                .await
                .into_iter()
                .flatten(),
        );
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

    #[tokio::test]
    async fn undos_pushed_beside_run_together_and_groups_keep_their_order() {
        use std::time::{Duration, Instant};
        let log = recorder();
        let mut stack = GuardStack::new("b");
        let step = |log: &Arc<Mutex<Vec<String>>>, name: &'static str| {
            let log = log.clone();
            move || async move {
                log.lock().unwrap().push(format!("{name} begins"));
                tokio::time::sleep(Duration::from_millis(200)).await;
                log.lock().unwrap().push(format!("{name} ends"));
                Ok::<(), BoxError>(())
            }
        };
        stack.push("network a", step(&log, "network a"));
        stack.push_beside("network b", step(&log, "network b"));
        stack.push("bundle", step(&log, "bundle"));
        stack.push_beside("agent", step(&log, "agent"));

        let began = Instant::now();
        let errors = stack.unwind().await;
        let took = began.elapsed();

        assert!(errors.is_empty());
        let log = log.lock().unwrap().clone();
        // Both containers go before either network is touched; within a group, together.
        let at = |what: &str| log.iter().position(|l| l == what).unwrap();
        assert!(
            at("agent ends").max(at("bundle ends"))
                < at("network a begins").min(at("network b begins")),
            "{log:?}"
        );
        assert!(
            at("bundle begins") < at("agent ends") && at("agent begins") < at("bundle ends"),
            "{log:?}"
        );
        assert!(took < Duration::from_millis(700), "serial: {took:?}");
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
